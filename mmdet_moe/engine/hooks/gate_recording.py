"""Keep one gate recorder active across hook calls (e.g. a whole val epoch)."""
from typing import Optional

from mmengine.model import is_model_wrapper

from ...layers import GateRecorder, record_gates


def unwrap(model):
    """The model inside a DDP / FSDP wrapper, or the model itself."""
    return model.module if is_model_wrapper(model) else model


class GateRecordingMixin:
    """For hooks: :meth:`start_recording` opens :func:`record_gates` on the runner's
    model, :meth:`stop_recording` closes it; ``self.recorder`` is None in between."""
    recorder: Optional[GateRecorder] = None
    _recording = None

    def start_recording(self, runner) -> None:
        self.stop_recording()
        self._recording = record_gates(unwrap(runner.model))
        self.recorder = self._recording.__enter__()

    def stop_recording(self) -> None:
        if self._recording is not None:
            self._recording.__exit__(None, None, None)
            self._recording = self.recorder = None
