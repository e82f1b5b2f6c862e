r"""Routing supervised by relative object scale: the positive control of the within-level
scale measure (as DAMEX supervises routing by dataset).

Every positive anchor of a head whose gates route per location (``gate_mode='pixel'``)
names the expert its location should pick: the bin of its ground-truth box's relative
scale ``log2(√(w·h) / s_l)`` (s_l: the level's reference size,
:func:`~mmdet_moe.models.level_reference_sizes`) among ``edges`` (N − 1 increasing
values, expert i for scales in [edges[i−1], edges[i])). The loss is the cross-entropy
of each MoE module's clean gate logits at the anchor's location against that expert,
averaged over positive anchors and weighted:

.. math:: L = w \cdot \frac{1}{P} \sum_{a \in \text{pos}} -\log \mathrm{softmax}(h_{loc(a)})_{t(a)}

It is computed densely over all anchors with the positives as a mask, so training
reads nothing back to the host.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def default_edges(num_experts: int) -> List[float]:
    """N − 1 edges splitting the anchor octave above the reference size, [0, 1),
    evenly: the scales of the anchors RetinaNet places on a level, where its positives
    concentrate (N = 4: 0.25, 0.5, 0.75)."""
    return [i / num_experts for i in range(1, num_experts)]


def check_routing_supervision(cfg: Optional[dict], num_experts: int,
                              pixel_gates: bool) -> Optional[dict]:
    """The normalised ``routing_supervision`` config (weight, edges), or None."""
    if cfg is None:
        return None
    cfg = dict(cfg)
    unknown = set(cfg) - {'weight', 'edges'}
    if unknown:
        raise ValueError(f'routing_supervision: unknown keys {sorted(unknown)}; it takes '
                         "'weight' (> 0) and 'edges' (N − 1 increasing relative scales)")
    if not pixel_gates:
        raise ValueError("routing_supervision needs gates that route per location: set "
                         "gate_cfg=dict(gate_mode='pixel', ...); a per-image gate has one "
                         'row for objects of every scale')
    weight = cfg.get('weight', 1.0)
    if not isinstance(weight, (int, float)) or not weight > 0:
        raise ValueError(f'routing_supervision weight={weight!r}: a number > 0')
    edges = list(cfg.get('edges') or default_edges(num_experts))
    if len(edges) != num_experts - 1 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f'routing_supervision edges={edges!r}: {num_experts - 1} increasing '
                         f'relative scales (log2), one between each two of the '
                         f'{num_experts} experts')
    return dict(weight=float(weight), edges=[float(e) for e in edges])


def relative_scale_experts(boxes: Tensor, reference: float, edges: Tensor) -> Tensor:
    """(..., 4) xyxy boxes → (...,) the expert of each box's relative scale
    ``log2(√(w·h) / reference)`` among ``edges``."""
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).clamp_min(1e-6)
    scale = torch.log2(area.sqrt() / reference)
    return torch.bucketize(scale, edges.to(scale.dtype), right=True)


def scale_routing_loss(gate_logits: Tensor, level_shapes: Sequence[Sequence[int]],
                       positives: Sequence[Tensor], gt_boxes: Sequence[Tensor],
                       reference_sizes: Sequence[float], edges: Sequence[float]) -> Tensor:
    """Cross-entropy of per-location gate logits against each positive anchor's
    relative-scale expert, averaged over positives.

    Args:
        gate_logits: (Σ_l B·H_l·W_l, N) clean logits of a per-location gate, level by
            level, each in (image, row, column) order.
        level_shapes: (B, H_l, W_l) per level.
        positives: per level (B, H_l·W_l·A) bool, the positive anchors (mmdet's
            (H, W, A) anchor order).
        gt_boxes: per level (B, H_l·W_l·A, 4) the box each anchor is assigned (any
            value where not positive).
        reference_sizes: s_l per level.
        edges: N − 1 increasing relative scales.

    Returns:
        The mean cross-entropy, 0 (with gradient) without positives.
    """
    edges = torch.as_tensor(edges, device=gate_logits.device)
    log_probs = F.log_softmax(gate_logits.float(), dim=1)
    total = log_probs.new_zeros(())
    count = log_probs.new_zeros(())
    for rows, (batch, height, width), pos, boxes, reference in zip(
            log_probs.split([b * h * w for b, h, w in level_shapes]), level_shapes,
            positives, gt_boxes, reference_sizes, strict=True):
        anchors = pos.shape[1] // (height * width)
        targets = relative_scale_experts(boxes.float(), reference, edges)
        per_location = rows.view(batch, height * width, 1, -1).expand(-1, -1, anchors, -1)
        picked = per_location.gather(3, targets.view(batch, height * width, anchors, 1))
        mask = pos.view(batch, height * width, anchors).to(picked.dtype)
        total = total - (picked[..., 0] * mask).sum()
        count = count + mask.sum()
    return total / count.clamp_min(1.0)
