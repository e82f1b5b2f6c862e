"""Tag the detections of a two-stage detector with the experts that produced them.

A RoI head runs its bbox head on a batch of RoIs: a MoE layer there gates every RoI
on its own pooled features, i.e. per object. :func:`tagged_predict_bbox`, which
``StandardRoIHead.predict_bbox`` (Faster R-CNN, Mask R-CNN, ...) and
``CascadeRoIHead.predict_bbox`` (Cascade (Mask) R-CNN, HTC, SCNet) run when a bbox
head has MoE modules or the proposals are tagged (see :mod:`..mmdet_patches`), notes
which RoI each kept detection comes from (the indices ``multiclass_nms`` keeps, read
through a recording ``multiclass_nms`` bound to the decoding bbox head alone, see
:mod:`..rebinding`) and adds:

- ``expert_weights`` (num_dets, M, N): the gate weights of the proposal it came from
  (MoE in the RPN or the FPN neck, tagged per (image, level) by the dense-head
  tagging), then those of its RoI in each MoE layer of the bbox head(s), stage by
  stage; metainfo ``expert_layers`` names the M layers (N: the largest number of
  experts, zeros past a layer's own);
- ``levels``: the FPN level the RoI was pooled from at the first stage when a bbox
  head has MoE layers, else the level of the proposal (also when the extractor pools
  every RoI from every level, as GRoIE's does; without proposal levels, none).

A cascade keeps one RoI per proposal through its stages (stage s + 1 pools the box
stage s regressed from RoI j as its RoI j, in the same order, for every image with
proposals) and decodes the last stage's RoIs, so a detection that ``multiclass_nms``
keeps at flat index i (RoI × class, also for class-agnostic regression: the boxes are
expanded per class) comes from RoI ``i // num_classes`` at every stage. Its
``levels`` is that of the first stage, the level of the proposal's own box, for one
level per detection: it is the level Faster R-CNN reports for the same proposal, and
the one the first stage's gates saw; a later stage pools its refined box from the
level that box maps to, which differs only where the refinement crosses a level's
scale boundary (``finest_scale × 2^l``). :func:`first_stage` gives the module whose
scale defines these levels.

Boxes, scores and labels are those of the stock code, which runs unchanged. The
gate records of the per-RoI layers are marked with the image of each row, so that
per-image statistics average an image's RoIs.
"""
from contextlib import contextmanager
from typing import Callable, Iterator, List

import torch
import torch.nn as nn
from mmengine.structures import InstanceData

from mmdet.models.layers import multiclass_nms
from mmdet.models.roi_heads import CascadeRoIHead, StandardRoIHead
from mmdet.structures.bbox import bbox2roi

from ...layers import mark_row_images, record_gates
from ..dense_heads.expert_tagging import cat_expert_tags, moe_modules
from ..rebinding import method_global, method_seeing
from .query_tagging import QUERY_ROI_HEADS

#: the RoI heads whose own ``predict_bbox`` :mod:`..mmdet_patches` wraps with
#: :func:`tagged_predict_bbox`
TAGGED_ROI_HEADS = (StandardRoIHead, CascadeRoIHead)


def roi_head_tags_detections(roi_head: nn.Module) -> bool:
    """Whether ``roi_head.predict_bbox`` is one the plugin tags: that of a class of
    :data:`TAGGED_ROI_HEADS` or :data:`.query_tagging.QUERY_ROI_HEADS`, not overridden
    by the head's class (``GridRoIHead`` and ``MultiInstanceRoIHead`` decode otherwise:
    untagged). A head of :data:`TAGGED_ROI_HEADS` then tags when a bbox head has MoE
    modules or the proposals are tagged, for an rcnn ``test_cfg`` (none: per-class
    scores, no detections to tag); a query head, under a MoE FPN neck."""
    method = getattr(type(roi_head), 'predict_bbox', None)
    return any(method is vars(cls)['predict_bbox']
               for cls in TAGGED_ROI_HEADS + QUERY_ROI_HEADS)


def stages(module: nn.Module) -> List[nn.Module]:
    """The per-stage modules of a cascade's ``nn.ModuleList`` (``bbox_head``,
    ``bbox_roi_extractor``) in stage order; ``[module]`` for a single-stage RoI head."""
    return list(module) if isinstance(module, nn.ModuleList) else [module]


@contextmanager
def kept_rois(bbox_head: nn.Module) -> Iterator[List[torch.Tensor]]:
    """Collect, image by image, the flat (RoI × class) indices ``multiclass_nms``
    keeps while this bbox head decodes in this block (images without RoIs call no
    ``multiclass_nms``: no entry)."""
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


def roi_rows(roi_head: nn.Module, recorder, num_rois: int) -> list:
    """[(name, (num_rois, N))] the gate rows of the MoE layers of the bbox head (of
    every stage's, in stage order)."""
    rows = []
    for module in moe_modules(roi_head.bbox_head):
        records = [r for r in recorder.records if r.module is module]
        if not records:  # reuses another module's routing
            continue
        if len(records) != 1 or records[0].weights.shape[0] != num_rois:
            raise RuntimeError(
                f'{type(roi_head).__name__}: MoE module {records[0].name} routed '
                f'{[len(r.weights) for r in records]} rows for {num_rois} RoIs; its '
                'detections can be tagged only when it gates each RoI once')
        rows.append((records[0].name, records[0].weights))
    return rows


def tagged_predict_bbox(stock: Callable, roi_head: nn.Module, x,
                        batch_img_metas: List[dict],
                        rpn_results_list: List[InstanceData], rcnn_test_cfg,
                        rescale: bool = False, **kwargs) -> List[InstanceData]:
    """``stock`` (``StandardRoIHead.predict_bbox`` or ``CascadeRoIHead.predict_bbox``,
    which takes ``kwargs``, e.g. HTC's ``semantic_feat``) with ``expert_weights``,
    ``levels`` and ``expert_layers`` added to each image's detections when a bbox head
    has MoE modules or the proposals are tagged; else ``stock`` alone."""
    from_rpn = all('expert_weights' in r for r in rpn_results_list)
    if not (moe_modules(roi_head.bbox_head) or from_rpn) or rcnn_test_cfg is None:
        return stock(roi_head, x, batch_img_metas, rpn_results_list, rcnn_test_cfg,
                     rescale, **kwargs)
    proposals = [r.bboxes for r in rpn_results_list]
    decoder = stages(roi_head.bbox_head)[-1]  # the last stage decodes
    with record_gates() as recorder, kept_rois(decoder) as kept:
        results = stock(roi_head, x, batch_img_metas, rpn_results_list, rcnn_test_cfg,
                        rescale, **kwargs)
    rois = bbox2roi(proposals)
    if not len(rois):
        return results
    with_rois = [b for b, boxes in enumerate(proposals) if len(boxes)]
    if len(kept) != len(with_rois) or len(results) != len(proposals):
        raise RuntimeError(f'{type(decoder).__name__} decodes otherwise than one '
                           'multiclass_nms per image with RoIs: its detections cannot '
                           'be tagged')
    kept_of = dict(zip(with_rois, kept))
    no_rois = rois.new_zeros(0, dtype=torch.long)
    rows = roi_rows(roi_head, recorder, len(rois))
    for name, _ in rows:
        mark_row_images(name, rois[:, 0].long())
    extractor = stages(roi_head.bbox_roi_extractor)[0]
    # an extractor that pools every RoI from every level (GRoIE's) maps none to one
    pooled = extractor.map_roi_levels(rois, extractor.num_inputs) \
        if rows and hasattr(extractor, 'map_roi_levels') else None
    starts = torch.tensor([0, *map(len, proposals)], device=rois.device).cumsum(0)
    for b, result in enumerate(results):
        local = kept_of.get(b, no_rois) // decoder.num_classes  # the RoI of each
        rpn = rpn_results_list[b]
        weights = [rpn.expert_weights[local]] if from_rpn else []
        weights += [w[starts[b] + local, None] for _, w in rows]
        result.expert_weights = cat_expert_tags(weights)
        if pooled is not None:
            result.levels = pooled[starts[b] + local]
        elif 'levels' in rpn:
            result.levels = rpn.levels[local]
        result.set_metainfo(dict(expert_layers=(
            list(rpn.metainfo['expert_layers']) if from_rpn else []) +
            [name for name, _ in rows]))
    return results
