"""The gates of a MoE FPN neck, per FPN level, for the detections of that level.

A neck runs before the heads decode, so its gates are recorded over the detector's
whole ``predict`` (:func:`recording_neck_gates`, opened by the detector's
``forward(mode='predict')``, see :mod:`..mmdet_patches`); the dense-head tagging
(:mod:`..dense_heads.expert_tagging`) reads them back (:func:`current_neck_gates`)
and adds one column of ``expert_weights`` per neck MoE module.

Which MoE modules feed output level l, for mmdet's ``FPN`` and its subclasses
(``MoEFPN``, ``PAFPN``, ...): those whose output *is* level l's map before the
next module's — ``lateral_convs[l]`` (the level's 1×1 lateral), ``fpn_convs[l]``
(its 3×3 output conv; for an extra level, the extra conv), and in ``PAFPN`` also
``downsample_convs[l-1]`` and ``pafpn_convs[l-1]`` (the bottom-up sum into level l
and its output conv). Any submodule of those (e.g. a ``ConvModule``'s ``.conv``)
counts. The laterals of the higher levels also reach level l, through the top-down
sum, but they reach every level below theirs: counting them would give the top
lateral the detections of all levels, and its per-detection table would again mix
levels, which is what the level-controlled view must avoid. The rule keeps one
level per module, so each neck module is measured over the detections of the level
it computes.

Not tagged (their layers keep the per-image view): MoE modules elsewhere in the
neck, necks that are not FPN subclasses (ChannelMapper, SSD, YOLOX's PAFPN, ...),
and a neck whose MoE modules route more than once per forward (``RFP`` runs the
FPN once per step).
"""
import threading
from contextlib import contextmanager
from dataclasses import replace
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from mmdet.models.necks import FPN

from ...layers import GateRecord, GateRecorder, is_moe_module, record_gates

#: {container of an FPN subclass: offset}: its i-th conv feeds output level i + offset
LEVEL_CONTAINERS: Dict[str, int] = dict(lateral_convs=0, fpn_convs=0, downsample_convs=1,
                                        pafpn_convs=1)

_LOCAL = threading.local()  # .stack: the NeckGates of the predicts running in this thread


def fed_level(path: str) -> Optional[int]:
    """The output level that the FPN submodule at ``path`` (relative to the neck, e.g.
    ``'fpn_convs.2.conv'``) feeds, or None for a module outside the counted convs."""
    parts = path.split('.')
    if len(parts) < 2 or parts[0] not in LEVEL_CONTAINERS or not parts[1].isdigit():
        return None
    return int(parts[1]) + LEVEL_CONTAINERS[parts[0]]


def tagged_neck_modules(neck) -> dict:
    """``{MoE module: the output level it feeds}`` of an FPN neck; {} for other necks."""
    if not isinstance(neck, FPN):
        return {}
    levels = {}
    for path, module in neck.named_modules():
        level = fed_level(path)
        if is_moe_module(module) and level is not None:
            levels[module] = level
    return levels


class NeckGates:
    """The gates that one forward of an FPN neck records, indexable per level."""

    def __init__(self, levels: dict, recorder: GateRecorder):
        self.levels, self.recorder = levels, recorder

    def level_records(self, sizes: Sequence[torch.Size]) -> List[List[Optional[GateRecord]]]:
        """Per neck MoE module that routed once and feeds one of the ``len(sizes)``
        levels the head sees: its record at that level, None at the others. A
        per-pixel gate map (B, N, H, W) is resized (nearest) to the level's
        ``sizes[l]`` = (H_l, W_l) when it differs (a gate on the input of a stride-2
        extra conv), so that a prior's location indexes it as it indexes the map
        the head saw."""
        modules = []
        for module, level in self.levels.items():
            records = [r for r in self.recorder.records if r.module is module]
            # none: reuses another's routing; several: the neck ran more than once
            if len(records) != 1 or level >= len(sizes):
                continue
            record = records[0]
            if record.pixel_weights is not None and \
                    record.pixel_weights.shape[-2:] != sizes[level]:
                record = replace(record, pixel_weights=F.interpolate(
                    record.pixel_weights, size=tuple(sizes[level]), mode='nearest'))
            modules.append([record if l == level else None for l in range(len(sizes))])
        return modules


def _stack() -> List[NeckGates]:
    if not hasattr(_LOCAL, 'stack'):
        _LOCAL.stack = []
    return _LOCAL.stack


@contextmanager
def recording_neck_gates(detector) -> Iterator[None]:
    """Record the gates of ``detector.neck`` in this block when it is an FPN with MoE
    modules that feed levels (else nothing happens), for :func:`current_neck_gates`."""
    levels = tagged_neck_modules(getattr(detector, 'neck', None))
    if not levels:
        yield
        return
    with record_gates() as recorder:
        _stack().append(NeckGates(levels, recorder))
        try:
            yield
        finally:
            _stack().pop()


def current_neck_gates() -> Optional[NeckGates]:
    """The neck gates of the detector predicting in this thread, or None."""
    stack = _stack()
    return stack[-1] if stack else None
