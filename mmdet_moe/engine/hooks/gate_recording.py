"""Keep one gate recorder active across hook calls (e.g. a whole val epoch)."""
from typing import Optional

from mmengine.model import BaseTTAModel, is_model_wrapper

from ...layers import GateRecorder, record_gates


def unwrap(model):
    """The detector inside DDP / FSDP wrappers and a test-time-augmentation model."""
    while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
        model = model.module
    return model


def tta_model(model):
    """The test-time-augmentation model (``tools/test.py --tta``) in ``model``, or None."""
    while is_model_wrapper(model):
        model = model.module
    return model if isinstance(model, BaseTTAModel) else None


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
