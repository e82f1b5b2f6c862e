"""The reference size s_l of each FPN level of a detector's dense head, for the
within-level relative scale ``log2(√(w·h) / s_l)`` of its detections."""
import math
from typing import List

import torch
from mmdet.models.task_modules.prior_generators import MlvlPointGenerator

from .roi_heads.expert_tagging import stages
from .roi_heads.query_tagging import QUERY_ROI_HEADS

# anchor-free heads: s_l = POINT_REFERENCE × stride_l, RetinaNet's anchor base size
# (octave_base_scale 4), so that relative scales of anchor and anchor-free heads read
# alike; per-level quantile bins make the NMI independent of this constant
POINT_REFERENCE = 4.0


class NoReferenceSizes(ValueError):
    """The detector's detections have no per-level reference size (the message says
    why)."""


def level_reference_sizes(head) -> List[float]:
    """s_l in input pixels for each level of ``head.prior_generator``.

    - anchors with ``octave_base_scale`` (RetinaNet, ATSS): ``octave_base_scale ×
      base_sizes[l]``, the smallest anchor of the level's octave;
    - other anchors (SSD, YOLO, explicit ``scales``): the geometric mean of √(w·h)
      over the level's base anchors;
    - points (``MlvlPointGenerator``: FCOS, ...): ``POINT_REFERENCE × stride_l``
      (√(stride_w · stride_h) for non-square strides).

    Raises:
        NoReferenceSizes: the head has no prior generator of these kinds.
    """
    prior_generator = getattr(head, 'prior_generator', None)
    if getattr(prior_generator, 'octave_base_scale', None) is not None:
        return [float(prior_generator.octave_base_scale * size)
                for size in prior_generator.base_sizes]
    if isinstance(getattr(prior_generator, 'base_anchors', None), list):
        # (A, 4) x1 y1 x2 y2 per level: exp(mean(½ log(w·h)))
        return [float(torch.exp(0.5 * torch.log(
                    (anchors[:, 2:] - anchors[:, :2]).double().prod(1)).mean()))
                for anchors in prior_generator.base_anchors]
    if isinstance(prior_generator, MlvlPointGenerator):
        return [POINT_REFERENCE * math.sqrt(w * h) for w, h in prior_generator.strides]
    raise NoReferenceSizes(
        f'the head ({type(head).__name__}) has no anchor or point prior generator '
        f'(prior_generator: {type(prior_generator).__name__}), so its FPN levels have '
        'no reference size')


def roi_level_sizes(detector, extractor) -> List[float]:
    """s_l of the levels ``extractor`` (a RoI extractor of ``detector``) pools RoIs
    from: ``finest_scale × 2^l``, as RoIs of about that size are pooled from level l."""
    if getattr(extractor, 'finest_scale', None) is None:
        raise NoReferenceSizes(
            f'the RoI extractor of {type(detector).__name__} '
            f'({type(extractor).__name__}) maps RoIs to levels without a '
            'finest_scale, so its levels have no reference size')
    return [float(extractor.finest_scale * 2 ** level)
            for level in range(extractor.num_inputs)]


def detector_reference_sizes(detector) -> List[float]:
    """s_l of the levels a ``detector``'s detections are tagged with: the dense head's
    (:func:`level_reference_sizes`); for a two-stage detector whose RoI bbox head holds
    MoE layers, those of the levels its RoI extractor (a cascade's first stage's)
    pools from (:func:`roi_level_sizes`), else the RPN's (its detections then carry
    their proposal's level); for a query RoI head (Sparse R-CNN), those of its last
    stage's extractor.

    Raises:
        NoReferenceSizes: a detector without a dense ``bbox_head`` or RoI head whose
            levels have a reference size.
    """
    roi_head = getattr(detector, 'roi_head', None)
    if isinstance(roi_head, QUERY_ROI_HEADS):
        # a query's detections carry the level its last stage pooled from
        return roi_level_sizes(detector, stages(roi_head.bbox_roi_extractor)[-1])
    if roi_head is not None:
        # a cascade's detections carry the level their first stage pooled from
        extractor = stages(getattr(roi_head, 'bbox_roi_extractor', None))[0]
        bbox_head = getattr(roi_head, 'bbox_head', None)
        if bbox_head is not None and any(getattr(m, 'is_moe_module', False)
                                         for m in bbox_head.modules()):
            return roi_level_sizes(detector, extractor)
        return level_reference_sizes(getattr(detector, 'rpn_head', None))
    head = getattr(detector, 'bbox_head', None)
    if head is None:
        raise NoReferenceSizes(f'{type(detector).__name__} has no dense bbox_head whose '
                               'detections carry FPN levels')
    return level_reference_sizes(head)
