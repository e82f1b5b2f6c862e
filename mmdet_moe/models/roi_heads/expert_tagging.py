"""Tag the detections of a two-stage detector with the experts that produced them.

A RoI head runs its bbox head on a batch of RoIs: a MoE layer there gates every RoI
on its own pooled features, i.e. per object. :func:`tagged_predict_bbox`, which
``StandardRoIHead.predict_bbox`` (Faster R-CNN, Mask R-CNN, ...) runs when its bbox
head has MoE modules or its proposals are tagged (see :mod:`..mmdet_patches`), notes
which RoI each kept detection comes from (the indices ``multiclass_nms`` keeps, read
through a recording ``multiclass_nms`` bound to this bbox head alone, see
:mod:`..rebinding`) and adds:

- ``expert_weights`` (num_dets, M, N): the gate weights of the proposal it came from
  (MoE in the RPN, tagged per (image, level) by the dense-head tagging), then those
  of its RoI (MoE in the bbox head); metainfo ``expert_layers`` names the M layers
  (N: the largest number of experts, zeros past a layer's own);
- ``levels``: the FPN level the RoI was pooled from when the bbox head has MoE
  layers, else the level of the proposal.

Boxes, scores and labels are those of the stock code, which runs unchanged. The
gate records of the per-RoI layers are marked with the image of each row, so that
per-image statistics average an image's RoIs.
"""
from contextlib import contextmanager
from typing import Callable, Iterator, List

import torch
from mmengine.structures import InstanceData

from mmdet.models.layers import multiclass_nms
from mmdet.structures.bbox import bbox2roi

from ...layers import mark_row_images, record_gates
from ..dense_heads.expert_tagging import cat_expert_tags, moe_modules
from ..rebinding import method_global, method_seeing


@contextmanager
def kept_rois(bbox_head) -> Iterator[List[torch.Tensor]]:
    """Collect, image by image, the flat (RoI × class) indices ``multiclass_nms``
    keeps while this bbox head decodes in this block."""
    kept: List[torch.Tensor] = []
    if method_global(bbox_head, '_predict_by_feat_single', 'multiclass_nms') \
            is not multiclass_nms:
        yield kept
        return

    def recording(*args, return_inds: bool = False, **kwargs):
        dets, labels, inds = multiclass_nms(*args, return_inds=True, **kwargs)
        kept.append(inds)
        return (dets, labels, inds) if return_inds else (dets, labels)

    with method_seeing(bbox_head, '_predict_by_feat_single', multiclass_nms=recording):
        yield kept


def roi_rows(roi_head, recorder, num_rois: int):
    """[(name, (num_rois, N))] the gate rows of the bbox head's MoE layers."""
    rows = []
    for module in moe_modules(roi_head.bbox_head):
        records = [r for r in recorder.records if r.module is module]
        if not records:  # reuses another module's routing
            continue
        if len(records) != 1 or records[0].weights.shape[0] != num_rois:
            raise RuntimeError(
                f'{type(roi_head.bbox_head).__name__}: MoE module {records[0].name} routed '
                f'{[len(r.weights) for r in records]} rows for {num_rois} RoIs; its '
                'detections can be tagged only when it gates each RoI once')
        rows.append((records[0].name, records[0].weights))
    return rows


def tagged_predict_bbox(stock: Callable, roi_head, x, batch_img_metas: List[dict],
                        rpn_results_list: List[InstanceData], rcnn_test_cfg,
                        rescale: bool = False) -> List[InstanceData]:
    """``stock`` (``StandardRoIHead.predict_bbox``) with ``expert_weights``, ``levels``
    and ``expert_layers`` added to each image's detections when the bbox head has MoE
    modules or the proposals are tagged; else ``stock`` alone."""
    from_rpn = all('expert_weights' in r for r in rpn_results_list)
    if not (moe_modules(roi_head.bbox_head) or from_rpn) or rcnn_test_cfg is None:
        return stock(roi_head, x, batch_img_metas, rpn_results_list, rcnn_test_cfg, rescale)
    proposals = [r.bboxes for r in rpn_results_list]
    with record_gates() as recorder, kept_rois(roi_head.bbox_head) as kept:
        results = stock(roi_head, x, batch_img_metas, rpn_results_list, rcnn_test_cfg,
                        rescale)
    rois = bbox2roi(proposals)
    if not len(rois):
        return results
    if len(kept) != len(results):
        raise RuntimeError(f'{type(roi_head.bbox_head).__name__} decodes otherwise than '
                           'one multiclass_nms per image: its detections cannot be tagged')
    rows = roi_rows(roi_head, recorder, len(rois))
    for name, _ in rows:
        mark_row_images(name, rois[:, 0].long())
    extractor = roi_head.bbox_roi_extractor
    pooled = extractor.map_roi_levels(rois, extractor.num_inputs)
    starts = torch.tensor([0, *map(len, proposals)], device=rois.device).cumsum(0)
    for b, (result, inds) in enumerate(zip(results, kept)):
        local = inds // roi_head.bbox_head.num_classes  # the RoI of each detection
        rpn = rpn_results_list[b]
        weights = [rpn.expert_weights[local]] if from_rpn else []
        weights += [w[starts[b] + local, None] for _, w in rows]
        result.expert_weights = cat_expert_tags(weights)
        result.levels = pooled[starts[b] + local] if rows else rpn.levels[local]
        result.set_metainfo(dict(expert_layers=(
            list(rpn.metainfo['expert_layers']) if from_rpn else []) +
            [name for name, _ in rows]))
    return results
