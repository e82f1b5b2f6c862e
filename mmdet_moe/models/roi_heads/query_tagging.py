"""Tag the detections of Sparse R-CNN's query head (``SparseRoIHead``, also QueryInst's)
with the gates of the MoE FPN neck level that fed them.

Sparse R-CNN has no RPN to carry the neck's tags: its proposals are learned boxes, one
per query, and every stage pools each query's current box as one RoI (query j of image
b is RoI j of b at every stage) from the one FPN level ``map_roi_levels`` assigns it,
then regresses the query's next box. ``SparseRoIHead.predict_bbox`` ends with a
per-image top-k over the last stage's (query × class) scores: detection i is query
``topk_inds[i] // num_classes``. :func:`tagged_sparse_predict_bbox`, which
:mod:`..mmdet_patches` runs in its place when the neck's gates are recorded (see
:mod:`..necks.neck_tagging`), records those indices as the stock code computes them
(the last stage's scores are handed on as a tensor whose ``topk`` calls are noted) and
adds:

- ``levels``: the level the last stage pooled the query's RoI from. The first stage's
  RoI is a learned box, the same for every image (the whole image at
  initialisation), so its level says nothing of the object; the last stage's RoI is
  the box the detection is regressed from, as a cascade's RoI is its proposal box.
- ``expert_weights`` (num_dets, M, N): per neck MoE module, the (image, level) gate
  row of that level if the module feeds it, else zeros, as a dense head or the RPN
  tags its detections (:meth:`~..dense_heads.expert_tagging.GateMaps.level_weights`);
  metainfo ``expert_layers`` names the M modules.

Boxes, scores and labels (and QueryInst's mask inputs) are those of the stock code.
The DIIHead of each stage has no conv a ``MoEDetector`` path could replace, so MoE
layers of the bbox heads are not tagged here (:mod:`..tag_coverage` says so).
"""
from typing import Callable, List, Tuple

import torch
import torch.nn as nn
from mmdet.models.roi_heads import SparseRoIHead
from mmengine.structures import InstanceData
from torch import Tensor

from ...layers import GateRecorder
from ..dense_heads.expert_tagging import GateMaps, with_tags
from ..necks.neck_tagging import current_neck_gates
from ..rebinding import method_wrapped

#: the query RoI heads whose own ``predict_bbox`` :mod:`..mmdet_patches` wraps with
#: :func:`tagged_sparse_predict_bbox`
QUERY_ROI_HEADS = (SparseRoIHead,)


def topk_recording(scores: Tensor, kept: List[Tensor]) -> Tensor:
    """``scores`` as a tensor whose derived tensors (indexing, ``flatten``, ...) append
    to ``kept`` the indices of each ``topk`` taken of them; they hold the same values
    (convert them back with :func:`plain`)."""

    class TopkRecording(Tensor):

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            out = super().__torch_function__(func, types, args, kwargs or {})
            if func in (Tensor.topk, torch.topk):
                kept.append(out[1].as_subclass(Tensor))
            return out

    return scores.as_subclass(TopkRecording)


def plain(results: InstanceData) -> InstanceData:
    """``results`` with every tensor field a plain ``torch.Tensor``."""
    for key, value in results.items():
        if isinstance(value, Tensor) and type(value) is not Tensor:
            results[key] = value.as_subclass(Tensor)
    return results


def tagged_sparse_predict_bbox(stock: Callable, roi_head: nn.Module, x: Tuple[Tensor],
                               batch_img_metas: List[dict],
                               rpn_results_list: List[InstanceData], rcnn_test_cfg,
                               rescale: bool = False) -> List[InstanceData]:
    """``stock`` (``SparseRoIHead.predict_bbox``; x: L maps (B, C, H_l, W_l)) with
    ``levels``, ``expert_weights`` and ``expert_layers`` added to each image's
    detections under a MoE FPN neck; else ``stock`` alone."""
    neck = current_neck_gates()
    # no module of the head routed in this empty recorder: the neck's columns alone
    gates = GateMaps(roi_head, GateRecorder(), [level.shape[-2:] for level in x], neck) \
        if neck is not None else None
    if not gates:
        return stock(roi_head, x, batch_img_metas, rpn_results_list, rcnn_test_cfg,
                     rescale)
    last_stage, last_rois, kept = roi_head.num_stages - 1, [], []

    def recording_last_stage(bbox_forward, stage, x, rois, *args, **kwargs):
        results = bbox_forward(stage, x, rois, *args, **kwargs)
        if stage == last_stage:
            last_rois.append(rois)
            results['cls_score'] = topk_recording(results['cls_score'], kept)
        return results

    with method_wrapped(roi_head, '_bbox_forward', recording_last_stage):
        results = [plain(r) for r in stock(roi_head, x, batch_img_metas,
                                           rpn_results_list, rcnn_test_cfg, rescale)]
    if not last_rois:  # no proposal in the whole batch: no stage ran, no detection
        rois, pooled = x[0].new_zeros(0, 5), x[0].new_zeros(0, dtype=torch.long)
        kept = [pooled] * len(results)
    else:
        (rois, ) = last_rois
        extractor = roi_head.bbox_roi_extractor[last_stage]
        pooled = extractor.map_roi_levels(rois, extractor.num_inputs)
    if len(kept) != len(results):
        raise RuntimeError(f'{type(roi_head).__name__} took {len(kept)} top-k of its '
                           f'scores for {len(results)} images: its detections cannot '
                           'be tagged')
    num_classes = roi_head.bbox_head[last_stage].num_classes
    for b, (result, inds) in enumerate(zip(results, kept)):
        # query j of image b is its j-th RoI; detection i is query inds[i] // classes
        rois_of_b = (rois[:, 0] == b).nonzero()[:, 0]
        levels = pooled[rois_of_b[inds // num_classes]]
        with_tags(result, levels, gates.level_weights(b, levels), gates)
    return results
