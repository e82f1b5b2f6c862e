"""Which MoE layers of a detector tag its detections, and why the others do not.

A layer whose detections are not tagged keeps per-image rows in the statistics
(``detection_gates: 'image'``). :func:`untagged_layers_reason` says why in one line,
naming the component, for the statistics hook and the census (``tools/moe_census.py``):

- DETR-family detectors: every query attends to every level of the neck (and the
  backbone), so a detection draws on all of them and no per-detection tag would be
  honest; per-image rows are the tag;
- neck MoE modules that do not compute one level's map (see
  :mod:`.necks.neck_tagging`);
- per-pixel gates in an RPN or in the neck under it: the RPN keeps no prior indices;
- a dense head or RoI head whose decode the tagging does not read
  (:func:`.dense_heads.expert_tagging.untagged_decode`,
  :func:`.roi_heads.roi_head_tags_detections`), and MoE modules in the bbox heads of
  a query RoI head (Sparse R-CNN's, which tags the neck's gates only).
"""
from typing import List, Optional

import torch.nn as nn
from mmdet.models.dense_heads import CascadeRPNHead, RPNHead
from mmdet.models.detectors import DetectionTransformer

from ..layers import is_moe_module, routes_pixels
from .dense_heads.expert_tagging import untagged_decode
from .necks.neck_tagging import tagged_neck_modules
from .roi_heads import QUERY_ROI_HEADS, roi_head_tags_detections


def _moe(module: Optional[nn.Module]) -> List[nn.Module]:
    return [] if module is None else [m for m in module.modules() if is_moe_module(m)]


def untagged_layers_reason(detector: nn.Module) -> Optional[str]:
    """None when every MoE layer of ``detector`` that its detections come from tags
    them, else one line: which component keeps per-image rows, and why."""
    name = type(detector).__name__
    if not _moe(detector):
        return None
    if isinstance(detector, DetectionTransformer):
        return (f'{name}: every query attends to every level, so a detection draws on '
                'all of them: its MoE layers keep per-image rows, the honest tag there')
    reasons = []
    neck = getattr(detector, 'neck', None)
    tagged_neck = tagged_neck_modules(neck) if neck is not None else {}
    untagged_neck = [m for m in _moe(neck) if m not in tagged_neck]
    if untagged_neck:
        reasons.append(f'{len(untagged_neck)} MoE module(s) of {type(neck).__name__} '
                       'do not compute one FPN level\'s map (only an FPN\'s per-level '
                       'convs are tagged)')
    roi_head = getattr(detector, 'roi_head', None)
    head = getattr(detector, 'rpn_head' if roi_head is not None else 'bbox_head', None)
    if roi_head is not None and not roi_head_tags_detections(roi_head):
        reasons.append(f'{type(roi_head).__name__} has its own predict_bbox, which the '
                       'tagging does not read')
    elif isinstance(roi_head, QUERY_ROI_HEADS):  # no RPN: the neck's tags come here
        if _moe(roi_head):
            reasons.append(f'{type(roi_head).__name__} tags its detections with the '
                           "neck's gates only, not with its bbox heads' MoE modules")
    elif head is not None and (_moe(head) or tagged_neck or
                               (roi_head is None and not untagged_neck)):
        why = untagged_decode(head)
        if why is not None:
            reasons.append(why)
    if roi_head is not None and isinstance(head, (RPNHead, CascadeRPNHead)):
        # an RPN keeps no prior indices (expert_tagging.rpn_post_process)
        pixel = [m for m in _moe(head) + list(tagged_neck)
                 if routes_pixels(m)]
        if pixel:
            reasons.append(f'{type(head).__name__} keeps no prior indices: the per-pixel '
                           f'gates of {len(pixel)} MoE module(s) cannot be read at a '
                           "proposal's location")
    if not reasons:
        return None
    return f'{name}: ' + '; '.join(reasons) + ': those layers keep per-image rows'
