"""Tag the detections of every dense head with their FPN level and their experts'
gate weights.

mmdet's dense heads (RetinaNet, FCOS, ATSS, GFL, FSAF, TOOD, the RPN, ...) decode in
``BaseDenseHead._predict_by_feat_single``-style code: per level,
``filter_scores_and_topk`` keeps the best priors, the kept boxes of all levels are
concatenated and ``_bbox_post_process`` rescales, filters and runs NMS by indexing an
``InstanceData``. :func:`tagged_predict`, which ``BaseDenseHead.predict`` runs for a
head that holds MoE modules and decodes that way (see :mod:`..mmdet_patches`),
records the gates of its forward, notes which priors each level keeps (the decode
runs with a recording ``filter_scores_and_topk`` bound to this head alone, see
:mod:`..rebinding`), and hands ``_bbox_post_process`` the kept detections with two
more fields, which its indexing carries through NMS:

- ``levels`` (num_dets,): the FPN level of each detection;
- ``expert_weights`` (num_dets, M, N): for each of the head's M MoE modules that
  route (a module reusing another's gate decision adds nothing), the gate weights
  that produced the detection: those of its (image, level), or for a per-pixel gate
  (μMoE, ``gate_mode='pixel'``) those at the location of its prior; N is the largest
  number of experts, a module with fewer (e.g. a pruned one) has zeros past its own;
- metainfo ``expert_layers``: the names of those M modules.

Under a MoE FPN neck (predicting through ``forward(mode='predict')``), the head tags
its detections even without MoE modules of its own, and the M columns go on with
the neck's modules (:mod:`..necks.neck_tagging` says which convs feed a level): a
neck module's column holds the gate row (or the vector at the prior's location) of
the level it feeds for that level's detections, and zeros for the others' (a gate
row sums to 1, so a zero row means "did not feed this detection").

The RPN keeps its own top-k, no prior index: its proposals are tagged from the
``level_ids`` its decode hands ``_bbox_post_process``, per-image gates only. Cascade
RPN predicts in its own ``CascadeRPNHead.predict`` (wrapped apart, see
:mod:`..mmdet_patches`): :func:`tagged_cascade_rpn_predict` tags the last stage's
proposals alike, with the rows of every stage's MoE modules at the proposal's level.

Heads with their own ``predict_by_feat`` (YOLOX, YOLOv3, PAA, CenterNet, YOLACT) are
tagged from the prior :mod:`.own_decodes` finds behind each row they keep, as an index
into all levels' priors (:meth:`GateMaps.prior_weights`), CornerNet's corner pairs
with the level they are decoded from. Boxes, scores and labels are exactly those of
the stock decode. :func:`untagged_reason` says, in one line, why a head's detections
are not tagged (no MoE module to tag, or a decode the tagging does not read).
"""
import itertools
import logging
from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import print_log
from torch import Tensor

from mmdet.models.dense_heads import (CascadeRPNHead, CondInstBboxHead, SABLRetinaHead,
                                     StageCascadeRPNHead)
from mmdet.models.dense_heads.base_dense_head import BaseDenseHead
from mmdet.models.dense_heads.rpn_head import RPNHead
from mmdet.models.utils import filter_scores_and_topk
from mmengine.structures import InstanceData

from ...layers import GateRecord, GateRecorder, is_moe_module, record_gates
from ..necks.neck_tagging import NeckGates, current_neck_gates
from ..rebinding import method_global, method_seeing, method_wrapped, uses_stock_methods
from .own_decodes import OwnDecode, UnmatchedRows, own_decode


def moe_modules(head) -> list:
    """The MoE modules in ``head`` (any module), in ``modules()`` order."""
    return [m for m in head.modules() if is_moe_module(m)]


def cat_expert_tags(parts: List[Tensor]) -> Tensor:
    """Concatenate (num_dets, M_i, N_i) tags along M, zero-padding each to the largest
    N (expert j of a module with fewer experts has weight 0)."""
    width = max(part.shape[-1] for part in parts)
    return torch.cat([F.pad(part, (0, width - part.shape[-1])) for part in parts], dim=1)


def keeps_priors_with_mmdet_topk(head) -> bool:
    """Whether the head's ``_predict_by_feat_single`` keeps priors with mmdet's
    ``filter_scores_and_topk`` (a global of its module)."""
    return (method_global(head, '_predict_by_feat_single', 'filter_scores_and_topk')
            is filter_scores_and_topk)


#: predict_by_feat functions that run ``_predict_by_feat_single`` once per image,
#: which keeps priors level by level and ends in ``_bbox_post_process`` (CondInst's
#: own adds its mask parameters to what it keeps, SABL's splits its box predictions
#: in two, and both decode alike)
PER_IMAGE_DECODES = (BaseDenseHead.predict_by_feat, CondInstBboxHead.predict_by_feat,
                     SABLRetinaHead.predict_by_feat)


def decodes_per_level(head) -> bool:
    """Whether the head decodes per image through :data:`PER_IMAGE_DECODES`, keeping
    priors with mmdet's ``filter_scores_and_topk`` or, as the RPN, tagging each kept
    box with its ``level_ids`` (what the tagging relies on)."""
    return (type(head).predict_by_feat in PER_IMAGE_DECODES and
            (keeps_priors_with_mmdet_topk(head) or isinstance(head, RPNHead)))


#: MoE modules whose calls did not match the head's levels, already logged
_UNMATCHED: set = set()


class GateMaps:
    """The gates of one forward of a head, per MoE module that routed, indexable per
    (image, level, prior): per level a record with ``weights`` (B, N), per-(image,
    level) gates, or ``pixel_weights`` (B, N, H, W), per-pixel gates. The head's
    modules come first, then those of its MoE FPN neck (``neck``, see
    :mod:`..necks.neck_tagging`). A module may serve some levels only (SSD has one
    conv per level): its calls are matched to levels by the size of the map each call
    saw (``call_sizes``, per module in call order). The record is None at the levels a
    module does not serve: their detections get a row of zeros there (a gate row sums
    to 1)."""

    def __init__(self, head, recorder: GateRecorder, sizes: Sequence[torch.Size],
                 neck: Optional[NeckGates] = None,
                 call_sizes: Optional[Dict[nn.Module, List[torch.Size]]] = None):
        self.head_name = type(head).__name__
        self.modules: List[List[Optional[GateRecord]]] = []
        for module in moe_modules(head):
            records = sorted((r for r in recorder.records if r.module is module),
                             key=lambda r: r.call if r.level is None else r.level)
            if records:  # else it reuses another module's routing
                by_level = self._by_level(head, module, records, sizes,
                                          (call_sizes or {}).get(module, []))
                if by_level is not None:
                    self.modules.append(by_level)
        if neck is not None:
            self.modules += neck.level_records(sizes)

    def _by_level(self, head: nn.Module, module: nn.Module, records: List[GateRecord],
                  sizes: Sequence[torch.Size], seen: List[torch.Size]
                  ) -> Optional[List[Optional[GateRecord]]]:
        """The records of ``module`` per level (None where it did not run); None when
        its calls cannot be matched to levels: by the size of their maps, else, where
        levels share a size, by the module's place in per-level lists."""
        if len(records) == len(sizes):
            return records
        levels = [[level for level, size in enumerate(sizes) if size == s] for s in seen]
        if not (len(seen) == len(records) and all(len(match) == 1 for match in levels)):
            levels = [[level] for level in list_levels(head, module, len(sizes))]
        if len(records) < len(sizes) and len(levels) == len(records) and \
                len({match[0] for match in levels}) == len(records):
            by_level: List[Optional[GateRecord]] = [None] * len(sizes)
            for match, record in zip(levels, records):
                by_level[match[0]] = record
            return by_level
        # a prediction after training must not fail here: the module stays untagged
        # (its statistics keep per-image rows) and the log says why, once
        name = module.moe_name or type(module).__name__
        if name not in _UNMATCHED:
            _UNMATCHED.add(name)
            print_log(f'{self.head_name}: MoE module {name} was called {len(records)} times '
                      f'(on maps of {[tuple(s) for s in seen]}) for {len(sizes)} FPN levels '
                      f'of {[tuple(s) for s in sizes]}; its detections are not tagged (only '
                      'a module run once per level it serves, on a map of that level\'s '
                      'size, can be): its statistics keep per-image rows',
                      logger='current', level=logging.WARNING)
        return None

    @staticmethod
    def _any(records: List[Optional[GateRecord]]) -> GateRecord:
        return next(r for r in records if r is not None)

    @property
    def names(self) -> List[str]:
        """The layer of each of the M columns of ``expert_weights``."""
        return [self._any(records).name for records in self.modules]

    def __bool__(self) -> bool:
        return bool(self.modules)

    @property
    def pixel_layers(self) -> List[str]:
        """The layers among the M whose gates are per pixel (need a prior's location)."""
        return [self._any(records).name for records in self.modules
                if any(r is not None and r.pixel_weights is not None for r in records)]

    def level_weights(self, b: int, levels: Tensor) -> Tensor:
        """(len(levels), M, N): the (image, level) gate rows of image ``b``."""
        pixel = self.pixel_layers
        if pixel:
            raise RuntimeError(f'{self.head_name} keeps no prior indices: the per-pixel '
                               f'gates of {pixel} cannot be tagged in its '
                               "detections; use a per-image gate there (gate_mode='image')")
        per_module = []
        for records in self.modules:
            zeros = torch.zeros_like(self._any(records).weights[b])
            rows = [zeros if r is None else r.weights[b] for r in records]
            per_module.append(torch.stack(rows)[levels, None])
        return cat_expert_tags(per_module)

    def prior_weights(self, b: int, priors: Tensor,
                      level_priors: Sequence[int]) -> Tuple[Tensor, Tensor]:
        """The levels (len(priors),) and gate weights (len(priors), M, N) of image
        ``b``'s ``priors``: indices into all levels' priors, level after level, of
        ``level_priors[l]`` priors each."""
        ends = torch.tensor(level_priors, device=priors.device).cumsum(0)
        levels = torch.bucketize(priors, ends, right=True)
        if len(priors) and int(levels.max()) >= len(level_priors):
            raise RuntimeError(f'{self.head_name}: prior {int(priors.max())} is past the '
                               f'{int(ends[-1])} priors of its {len(level_priors)} levels')
        order = torch.argsort(levels, stable=True)
        weights = torch.cat([
            self.weights(b, level, priors[levels == level] - (ends[level] - count), count)
            for level, count in enumerate(level_priors)])
        return levels, weights[torch.argsort(order)]

    def weights(self, b: int, level: int, priors: Tensor, num_priors: int) -> Tensor:
        """(len(priors), M, N): the gate weights behind the kept ``priors`` (indices
        into the level's flattened (H, W, A) priors) of image ``b``."""
        per_module = []
        for records in self.modules:
            record = records[level]
            if record is None:  # a neck module that does not feed this level
                row = self._any(records).weights[b]
                per_module.append(row.new_zeros(len(priors), len(row)))
            elif record.pixel_weights is None:
                per_module.append(record.weights[b].expand(len(priors), -1))
            else:
                gates = record.pixel_weights[b]  # (N, H, W)
                pixels = gates.shape[1] * gates.shape[2]
                if num_priors % pixels:
                    raise RuntimeError(
                        f'{self.head_name}: a per-pixel gate map of '
                        f'{tuple(gates.shape[1:])} does not match the {num_priors} priors '
                        f'of level {level}')
                per_module.append(gates.flatten(1).t()[priors // (num_priors // pixels)])
        return cat_expert_tags([weights[:, None] for weights in per_module])


def list_levels(head: nn.Module, module: nn.Module, num_levels: int) -> List[int]:
    """The levels ``module`` serves by its place in ``head``, ascending: ``i`` where a
    path to it goes through entry ``i`` of an ``nn.ModuleList`` of one entry per level
    (CornerNet's ``tl_pool``, SSD's ``cls_convs``), a head running its levels in
    order."""
    levels = set()
    for path, found in head.named_modules(remove_duplicate=False):
        parent = head
        for part in path.split('.') if found is module else ():
            if isinstance(parent, nn.ModuleList) and len(parent) == num_levels:
                levels.add(int(part))
            parent = getattr(parent, part)
    return sorted(levels)


@contextmanager
def call_sizes(modules: List[nn.Module]) -> Iterator[Dict[nn.Module, List[torch.Size]]]:
    """Collect, per module, the spatial size of the map of each call in this block."""
    seen: Dict[nn.Module, List[torch.Size]] = {m: [] for m in modules}

    def note(module, args):
        seen[module].append(args[0].shape[-2:] if args and torch.is_tensor(args[0])
                            else None)

    handles = [m.register_forward_pre_hook(note) for m in modules]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def kept_priors(head) -> Iterator[List[Tensor]]:
    """Collect the indices of the priors ``filter_scores_and_topk`` keeps, call by call
    (level by level, image after image), while this head decodes in this block."""
    kept: List[Tensor] = []
    if not keeps_priors_with_mmdet_topk(head):
        yield kept  # the RPN keeps its own top-k and tags levels itself
        return

    def recording(scores, *args, **kwargs):
        result = filter_scores_and_topk(scores, *args, **kwargs)
        kept.append((result[2], scores.shape[0]))
        return result

    with method_seeing(head, '_predict_by_feat_single', filter_scores_and_topk=recording):
        yield kept


def post_processing(head, post_process: Callable):
    """Within the block, this head's ``_bbox_post_process(results, ...)`` runs as
    ``post_process(b, stock, results, ...)``, ``b`` counting its calls (one per image),
    ``stock`` the class's own, bound to ``head``."""
    images = itertools.count()
    return method_wrapped(head, '_bbox_post_process',
                          lambda stock, *args, **kwargs: post_process(next(images), stock,
                                                                      *args, **kwargs))


def with_tags(results: InstanceData, levels: Tensor, weights: Tensor,
              gates: GateMaps) -> InstanceData:
    """``results`` with ``levels`` (n,), ``expert_weights`` (n, M, N) and metainfo
    ``expert_layers``."""
    results.levels, results.expert_weights = levels, weights
    results.set_metainfo(dict(expert_layers=gates.names))
    return results


def tagged_own_decode(head, decode: OwnDecode, outs: tuple, batch_img_metas: List[dict],
                      rescale: bool, gates: GateMaps,
                      sizes: Sequence[torch.Size]) -> List[InstanceData]:
    """The stock ``predict_by_feat`` of a head with its own decode, whose rows (before
    NMS, where it has one) are tagged from the priors ``decode`` says they come from."""
    level_priors = decode.level_priors(sizes)

    def tag(b: int, results: InstanceData) -> InstanceData:
        return with_tags(results, *decode.tags(b, results, gates, level_priors), gates)

    def tag_then_post_process(b, stock, results, *args, **kwargs):
        return decode.post_process(stock, tag(b, results), *args, **kwargs)

    try:
        with decode.recording(), post_processing(head, tag_then_post_process) \
                if decode.post_processes else nullcontext():
            results = head.predict_by_feat(*outs, batch_img_metas=batch_img_metas,
                                           rescale=rescale)
            if not decode.post_processes:
                results = [tag(b, result) for b, result in enumerate(results)]
    except UnmatchedRows as err:
        # e.g. boxes clipped to the same image border by several priors: a prediction
        # must not fail on tagging; these detections go untagged, the log says why
        print_log(f'{type(head).__name__}: {err}; this batch keeps per-image rows',
                  logger='current', level=logging.WARNING)
        return head.predict_by_feat(*outs, batch_img_metas=batch_img_metas,
                                    rescale=rescale)
    return results


def tagged_by_level_ids(b: int, results: InstanceData, gates: GateMaps) -> InstanceData:
    """The RPN's kept boxes of image ``b`` (no prior indices, their ``level_ids``)
    tagged with their level and its gate rows."""
    levels = results.level_ids.long()
    return with_tags(results, levels, gates.level_weights(b, levels), gates)


#: (RPN class, per-pixel gate layers) whose untagged proposals were already logged
_PIXEL_UNDER_RPN: set = set()


def rpn_post_process(name: str, stock: Callable, b: int, results: InstanceData,
                     gates: GateMaps, *args, **kwargs) -> InstanceData:
    """``stock(results, ...)``, the ``_bbox_post_process`` of an RPN (class
    ``name``) of image ``b``'s kept boxes, tagged by their ``level_ids``. The tags are
    kept where no box survives (the RPN then builds a new, empty result without them,
    and the RoI head would leave the whole batch untagged). Per-pixel gates need each
    box's prior, which the RPN's own top-k does not keep: the proposals are then left
    untagged (per-image rows), with one log line."""
    pixel = gates.pixel_layers
    if pixel:
        if (name, tuple(pixel)) not in _PIXEL_UNDER_RPN:
            _PIXEL_UNDER_RPN.add((name, tuple(pixel)))
            print_log(f'{name} keeps no prior indices: the per-pixel gates of {pixel} '
                      'cannot be tagged in its proposals, which keep per-image rows; use '
                      "a per-image gate there (gate_mode='image')",
                      logger='current', level=logging.WARNING)
        return stock(results, *args, **kwargs)
    tagged = tagged_by_level_ids(b, results, gates)
    kept = stock(tagged, *args, **kwargs)
    if 'expert_weights' not in kept and len(kept) == 0:
        kept.levels, kept.expert_weights = tagged.levels[:0], tagged.expert_weights[:0]
        kept.set_metainfo(dict(expert_layers=tagged.metainfo['expert_layers']))
    return kept


def tagged_predict(head, x, batch_data_samples, rescale: bool = False):
    """``BaseDenseHead.predict`` that adds ``levels`` and ``expert_weights``: x is L
    maps (B, C, H_l, W_l), one data sample per image."""
    batch_img_metas = [s.metainfo for s in batch_data_samples]
    with record_gates() as recorder, call_sizes(moe_modules(head)) as seen:
        outs = head(x)
    gates = GateMaps(head, recorder, [level.shape[-2:] for level in x],
                     current_neck_gates(), seen)
    if not gates:
        return head.predict_by_feat(*outs, batch_img_metas=batch_img_metas, rescale=rescale)
    decode = own_decode(head)
    if decode is not None:
        return tagged_own_decode(head, decode, outs, batch_img_metas, rescale, gates,
                                 [level.shape[-2:] for level in x])
    num_levels = len(x)

    def tag_then_post_process(b, stock, results, *args, **kwargs):
        if not kept and 'level_ids' in results:  # the RPN: levels, no prior indices
            return rpn_post_process(type(head).__name__, stock, b, results, gates,
                                    *args, **kwargs)
        calls, kept[:] = kept[:num_levels], kept[num_levels:]
        if len(calls) != num_levels or sum(len(k) for k, _ in calls) != len(results):
            raise RuntimeError(f'{type(head).__name__} decodes image {b} otherwise than '
                               'one filter_scores_and_topk per level before '
                               '_bbox_post_process: its detections cannot be tagged')
        levels = torch.cat([torch.full((len(k),), level, dtype=torch.long, device=k.device)
                            for level, (k, _) in enumerate(calls)])
        weights = torch.cat([gates.weights(b, level, k, n)
                             for level, (k, n) in enumerate(calls)])
        return stock(with_tags(results, levels, weights, gates), *args, **kwargs)

    with kept_priors(head) as kept, post_processing(head, tag_then_post_process):
        return head.predict_by_feat(*outs, batch_img_metas=batch_img_metas,
                                    rescale=rescale)


#: the Cascade RPN's stage methods the tagging relies on: each stage's ``forward``
#: runs level l on level l's map; the last stage keeps ``level_ids`` per level and
#: its ``_bbox_post_process`` (the RPN's) carries the tags by indexing
CASCADE_STAGE_FORWARD = ('forward', 'forward_single')
CASCADE_STAGE_DECODE = ('predict_by_feat', '_predict_by_feat_single', '_bbox_post_process')


def reads_cascade_rpn(head) -> bool:
    """Whether ``head`` is a Cascade RPN that predicts with mmdet's
    ``CascadeRPNHead.predict`` and stages of ``StageCascadeRPNHead``'s own methods."""
    return (uses_stock_methods(head, CascadeRPNHead, ('predict', )) and
            all(uses_stock_methods(stage, StageCascadeRPNHead, CASCADE_STAGE_FORWARD)
                for stage in head.stages) and
            uses_stock_methods(head.stages[-1], StageCascadeRPNHead, CASCADE_STAGE_DECODE))


def tagged_cascade_rpn_predict(stock: Callable, head, x, batch_data_samples,
                               rescale: bool = False):
    """``CascadeRPNHead.predict`` (``stock``, run unchanged) whose proposals carry
    ``levels`` and ``expert_weights``: x is L maps (B, C, H_l, W_l). Every stage runs
    level l on level l's map (the previous stage's output there, and the anchors it
    refined there), and the last stage decodes per level keeping ``level_ids``, as
    the RPN does: a proposal of level l gets the (image, level l) gate rows of every
    stage's MoE modules and of the neck's. Per-pixel gates need the prior, which the
    decode does not keep: the proposals are then left untagged, with one log line."""
    last, gates = head.stages[-1], []

    def tag_then_post_process(b, post_process, results, *args, **kwargs):
        if not gates:  # the first image: every stage has run
            gates.append(GateMaps(head, recorder, [level.shape[-2:] for level in x],
                                  current_neck_gates(), seen))
        if not gates[0]:
            return post_process(results, *args, **kwargs)
        return rpn_post_process(type(head).__name__, post_process, b, results, gates[0],
                                *args, **kwargs)

    with record_gates() as recorder, call_sizes(moe_modules(head)) as seen, \
            post_processing(last, tag_then_post_process):
        return stock(head, x, batch_data_samples, rescale)


def tags_detections(head) -> bool:
    """Whether ``head.predict`` tags its detections: MoE modules in it or in the MoE
    FPN neck of the detector predicting, and a decode whose kept priors are known."""
    return untagged_reason(head) is None


def untagged_decode(head) -> Optional[str]:
    """None when ``head`` decodes in a way the tagging reads, else what it does
    instead, naming its class (e.g. 'XHead decodes with its own predict_by_feat, ...')."""
    if decodes_per_level(head) or own_decode(head) is not None or reads_cascade_rpn(head):
        return None
    if type(head).predict_by_feat is BaseDenseHead.predict_by_feat:
        why = ("keeps priors in its _predict_by_feat_single otherwise than mmdet's "
               'filter_scores_and_topk')
    else:
        why = ('decodes with its own predict_by_feat, whose kept priors the tagging '
               'does not read')
    return f'{type(head).__name__} {why}'


def untagged_reason(head) -> Optional[str]:
    """None when ``head.predict`` tags its detections, else one line naming the head
    class and why not."""
    if not (moe_modules(head) or current_neck_gates() is not None):
        return (f'{type(head).__name__} holds no MoE module and no MoE FPN neck feeds '
                'it: nothing to tag')
    why = untagged_decode(head)
    return None if why is None else f'{why}: its statistics keep per-image rows'
