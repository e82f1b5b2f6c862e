"""Recording of gate weights on the side, for statistics (zero work when inactive).

Usage::

    with record_gates(model) as recorder:
        model(inputs)
    recorder.records  # [GateRecord(name='neck.fpn_convs.0.conv', call=0, ...), ...]

MoE modules call :func:`record_gate` on every forward; it returns at once unless a
recorder is active, so training pays nothing for statistics. Recorders are per
thread: a recorder sees the forwards of the thread that opened it, so two threads
recording (or decoding tagged detections) at once never see each other's gates.
"""
import threading
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch.nn as nn
from torch import Tensor

_LOCAL = threading.local()  # .recorders: the active GateRecorders of this thread


def _active_recorders() -> List['GateRecorder']:
    if not hasattr(_LOCAL, 'recorders'):
        _LOCAL.recorders = []
    return _LOCAL.recorders


@dataclass
class GateRecord:
    """Gate weights of one call of one MoE module.

    Attributes:
        name: the module's path in the model (e.g. ``bbox_head.cls_moe``).
        call: index of this call of the module since the recorder was cleared.
        level: FPN level of the rows when the caller knows it, else ``None``.
        weights: (B, N) gate weights, detached (per-pixel gates: their mean).
        module: the MoE module itself.
        pixel_weights: (B, N, H, W) per-pixel gate weights, detached, or None.
        row_images: (B,) the image of each row when rows are not images (e.g. the
            RoIs of a two-stage detector's bbox head), else None.
    """
    name: str
    call: int
    level: Optional[int]
    weights: Tensor
    module: Optional[nn.Module] = None
    pixel_weights: Optional[Tensor] = None
    row_images: Optional[Tensor] = None


class GateRecorder:
    """Collects :class:`GateRecord` s while active (see :func:`record_gates`)."""

    def __init__(self):
        self.records: List[GateRecord] = []
        self._calls: Counter = Counter()

    def add(self, name: str, weights: Tensor, level: Optional[int] = None,
            module: Optional[nn.Module] = None,
            pixel_weights: Optional[Tensor] = None) -> None:
        self.records.append(GateRecord(
            name, self._calls[name], level, weights.detach(), module,
            None if pixel_weights is None else pixel_weights.detach()))
        self._calls[name] += 1

    def clear(self) -> None:
        """Forget all records (e.g. between batches); call counters restart."""
        self.records.clear()
        self._calls.clear()

    def by_layer(self) -> Dict[str, List[GateRecord]]:
        layers = defaultdict(list)
        for record in self.records:
            layers[record.name].append(record)
        return dict(layers)


def is_moe_module(module: nn.Module) -> bool:
    return getattr(module, 'is_moe_module', False)


def assign_moe_names(model: nn.Module) -> List[str]:
    """Name every MoE module (and its gate) after its path in ``model``.

    Returns:
        The names of the MoE modules, in ``named_modules`` order.
    """
    names = []
    for name, module in model.named_modules():
        if is_moe_module(module):
            module.moe_name = name or type(module).__name__
            gate = getattr(module, 'gate', None)
            if gate is not None and hasattr(gate, 'moe_name'):
                gate.moe_name = f'{module.moe_name}.gate'
            names.append(module.moe_name)
    return names


def record_gate(module: nn.Module, weights: Tensor, level: Optional[int] = None,
                pixel_weights: Optional[Tensor] = None) -> None:
    """Hand (B, N) gate weights of ``module`` (and, for per-pixel gates, the
    (B, N, H, W) map they average) to every active recorder."""
    recorders = getattr(_LOCAL, 'recorders', None)
    if not recorders:
        return
    name = getattr(module, 'moe_name', None) or type(module).__name__
    for recorder in recorders:
        recorder.add(name, weights, level, module, pixel_weights)


def mark_row_images(name: str, row_images: Tensor) -> None:
    """Say which image each row of the latest record of layer ``name`` belongs to, in
    active recorder of this thread (rows that are objects, not images)."""
    for recorder in _active_recorders():
        for record in reversed(recorder.records):
            if record.name == name:
                record.row_images = row_images.detach()
                break


@contextmanager
def record_gates(model: Optional[nn.Module] = None) -> Iterator[GateRecorder]:
    """Activate a :class:`GateRecorder`; names the MoE modules of ``model`` first."""
    if model is not None:
        assign_moe_names(model)
    recorder, active = GateRecorder(), _active_recorders()
    active.append(recorder)
    try:
        yield recorder
    finally:
        active.remove(recorder)
