"""Carry the tags of TridentNet's branch detections through its merge.

TridentNet runs its RPN and its RoI head on the stacked branch batch (one image per
(branch, image), branch after branch), so the RPN tagging and
:func:`.expert_tagging.tagged_predict_bbox` tag each branch image's detections with
the gates of that branch image: a branch sees its own dilation of the backbone, so its
gate rows are its own. ``TridentRoIHead.merge_trident_bboxes`` then concatenates the
detections of an image's branches and runs ``batched_nms`` into new ``InstanceData``
(with ``test_branch_idx`` >= 0, the default, over the one branch tested).
:func:`tagged_merge_trident_bboxes`, which :mod:`..mmdet_patches` runs in its place,
keeps each surviving detection's ``expert_weights`` and ``levels`` (TridentNet's
single C4 level: 0) from the branch detection it is, read from the indices
``batched_nms`` keeps (a recording ``batched_nms`` in a copy of the stock function's
globals, see :mod:`..rebinding`). Boxes, scores and labels are the stock ones.
"""
from typing import Callable, List

import torch
import torch.nn as nn
from mmcv.ops import batched_nms
from mmengine.structures import InstanceData

from ..rebinding import with_globals


def tagged_merge_trident_bboxes(stock: Callable, roi_head: nn.Module,
                                trident_results: List[InstanceData]) -> InstanceData:
    """``stock`` (``TridentRoIHead.merge_trident_bboxes``) with the ``expert_weights``
    (n, M, N), ``levels`` (n,) and metainfo ``expert_layers`` of the branch detections
    it keeps, when every branch's are tagged; else ``stock`` alone."""
    if not trident_results or not all('expert_weights' in r for r in trident_results):
        return stock(roi_head, trident_results)
    kept: List[torch.Tensor] = []

    def recording(*args, **kwargs):
        dets, keep = batched_nms(*args, **kwargs)
        kept.append(keep)
        return dets, keep

    merged = with_globals(stock, batched_nms=recording)(roi_head, trident_results)
    # no boxes in any branch: no batched_nms call, nothing kept
    weights = torch.cat([r.expert_weights for r in trident_results])
    keep = kept[0][:len(merged)] if kept else weights.new_zeros(0, dtype=torch.long)
    merged.expert_weights = weights[keep]
    if all('levels' in r for r in trident_results):
        merged.levels = torch.cat([r.levels for r in trident_results])[keep]
    merged.set_metainfo(dict(
        expert_layers=list(trident_results[0].metainfo['expert_layers'])))
    return merged
