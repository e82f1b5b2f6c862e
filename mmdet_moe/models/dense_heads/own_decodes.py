"""Which prior each detection comes from, for dense heads that decode with their own
``predict_by_feat``: YOLOX, YOLOv3, CenterNet, PAA (and LAD, which inherits PAA's),
YOLACT, CornerNet and CentripetalNet.

Each runs the head's stock decode with a recorder on what that decode already
computes, and answers, per image, which prior every row it hands to NMS comes from:
an index into the image's priors of all levels, concatenated level by level, each
level's priors flattened as (H, W, A) (what :meth:`~.expert_tagging.GateMaps.prior_weights`
turns into a level and gate weights). No decode is re-implemented:

- YOLOX, YOLOv3 decode every prior at once (``YOLOXHead._bbox_decode``, the YOLOv3
  head's ``bbox_coder.decode``), then keep rows by score masks (and YOLOv3 by
  ``filter_scores_and_topk``): the decoded boxes of all priors are recorded, and a kept
  row is the prior whose decoded box it is, bit for bit. A box that two priors decode
  to is an error, never a guess.
- PAA decodes, level by level, the priors it keeps (its own top-k): each prior it
  decodes is found among the level's priors (recorded from ``grid_priors``); its NMS
  (``multiclass_nms``) is recorded with the indices it keeps, and score voting, which
  regroups the kept detections per class, is checked to only reorder them.
- CenterNet keeps the peaks ``get_topk_from_heatmap`` returns on its one level, in
  that order (no NMS in ``predict``).
- YOLACT keeps its own top-k priors per level, decodes them with one
  ``bbox_coder.decode`` per image and runs ``fast_nms``, which returns boxes, not
  indices: a kept box is the decoded row it equals bit for bit (as YOLOX's), whose
  prior is found among all levels' priors (recorded from ``grid_priors``).
- CornerNet and CentripetalNet decode corner pairs of their last feature level only
  (the earlier ones, Hourglass stacks, serve intermediate supervision): every
  detection comes from that level, whose (image, level) gate row is its tag; a
  per-pixel gate has no one location for a pair of corners, and leaves the batch
  untagged.
"""
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from mmdet.models.dense_heads import (CenterNetHead, CentripetalHead, CornerHead, PAAHead,
                                     YOLACTHead, YOLOV3Head, YOLOXHead)
from mmdet.models.layers import multiclass_nms
from mmdet.models.utils import get_topk_from_heatmap

from ..rebinding import method_seeing, method_wrapped, uses_stock_methods, with_globals


class UnmatchedRows(RuntimeError):
    """Kept rows whose prior cannot be told (no decoded row, or several, equal them)."""


def match_rows(rows: Tensor, table: Tensor, what: str) -> Tensor:
    """(len(rows),): for each row of ``rows`` (n, D), the index of the one row of
    ``table`` (P, D) bit-identical to it; an error where none or several are."""
    if len(rows) == 0:
        return torch.zeros(0, dtype=torch.long, device=rows.device)
    _, ids = torch.unique(torch.cat([table, rows]), dim=0, return_inverse=True)
    table_ids, row_ids = ids[:len(table)], ids[len(table):]
    counts = torch.bincount(table_ids, minlength=int(ids.max()) + 1)
    if not (counts[row_ids] == 1).all():
        bad = int((counts[row_ids] != 1).sum())
        raise UnmatchedRows(f'{bad} of {len(rows)} kept {what} match no row or several rows '
                           f'of the {len(table)} decoded ones: which prior they come from '
                           'is unknown, their detections cannot be tagged')
    where = torch.empty_like(counts)
    where[table_ids] = torch.arange(len(table), device=table.device)
    return where[row_ids]


def recording_calls(obj, method: str, into: list,
                    keep: Callable = lambda result, *args, **kwargs: result):
    """Within the block, ``obj.<method>`` (its own, e.g. a head's ``bbox_coder``'s)
    runs as before and appends ``keep(result, *args, **kwargs)`` to ``into`` per call;
    other objects are unchanged."""
    def recording(stock, *args, **kwargs):
        result = stock(*args, **kwargs)
        into.append(keep(result, *args, **kwargs))
        return result

    return method_wrapped(obj, method, recording)


class OwnDecode:
    """The priors behind the rows that one predict of ``head`` hands to NMS. Use
    :meth:`recording` around the stock ``predict_by_feat``; ``rows(b, results)``
    (the rows ``_bbox_post_process`` gets for image ``b``) gives their priors."""

    #: the class whose decode this reads, and the methods it relies on
    head_class: type = object
    methods: Sequence[str] = ('predict_by_feat', )
    #: whether the decode hands each image's rows to ``_bbox_post_process``
    post_processes = True

    def __init__(self, head):
        self.head = head

    @classmethod
    def reads(cls, head) -> bool:
        """Whether ``head`` decodes with ``head_class``'s own methods."""
        return uses_stock_methods(head, cls.head_class, cls.methods)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record what the decode of this block keeps."""
        raise NotImplementedError

    def rows(self, b: int, results) -> Tensor:
        """(len(results),): the prior of each row, an index into all levels' priors."""
        raise NotImplementedError

    def tags(self, b: int, results, gates, level_priors: Sequence[int]
             ) -> Tuple[Tensor, Tensor]:
        """The levels (n,) and gate weights (n, M, N) of image ``b``'s ``results``
        (``gates``: a :class:`~.expert_tagging.GateMaps`)."""
        return gates.prior_weights(b, self.rows(b, results), level_priors)

    def level_priors(self, sizes: Sequence[torch.Size]) -> List[int]:
        """The number of priors of each level (of maps of ``sizes``)."""
        return [count * size[0] * size[1] for count, size in
                zip(self.head.prior_generator.num_base_priors, sizes, strict=True)]

    def post_process(self, stock: Callable, results, *args, **kwargs):
        """The stock ``_bbox_post_process`` of tagged ``results``; it carries the
        tags by indexing them."""
        return stock(results, *args, **kwargs)


class DecodedBoxes(OwnDecode):
    """A head that decodes all priors of all levels at once, (B, P, 4), by
    ``owner().<decode>``, and keeps some of their rows."""
    decode = ''

    def owner(self):
        return self.head

    @contextmanager
    def recording(self) -> Iterator[None]:
        self.decoded: List[Tensor] = []
        with recording_calls(self.owner(), self.decode, self.decoded):
            yield

    def rows(self, b: int, results) -> Tensor:
        return match_rows(results.bboxes, self.decoded[-1][b],
                          f'{type(self.head).__name__} boxes')


class YOLOXDecode(DecodedBoxes):
    head_class = YOLOXHead
    methods = ('predict_by_feat', '_bbox_decode', '_bbox_post_process')
    decode = '_bbox_decode'


class YOLOV3Decode(DecodedBoxes):
    head_class = YOLOV3Head
    methods = ('predict_by_feat', '_bbox_post_process')
    decode = 'decode'

    def owner(self):
        return self.head.bbox_coder


class PAADecode(OwnDecode):
    """PAA (LAD): per image, one ``bbox_coder.decode`` per level of the priors it
    keeps; NMS by ``multiclass_nms`` and score voting, which build new results."""
    head_class = PAAHead
    methods = ('predict_by_feat', '_predict_by_feat_single', '_bbox_post_process',
               'score_voting')

    @contextmanager
    def recording(self) -> Iterator[None]:
        self.grids: List[List[Tensor]] = []
        self.decoded: List[Tensor] = []  # the priors of each decode call
        with recording_calls(self.head.prior_generator, 'grid_priors', self.grids), \
                recording_calls(self.head.bbox_coder, 'decode', self.decoded,
                                keep=lambda result, priors, *args, **kwargs: priors):
            yield

    def rows(self, b: int, results) -> Tensor:
        grids = self.grids[-1]
        calls, self.decoded[:] = self.decoded[:len(grids)], self.decoded[len(grids):]
        if sum(len(priors) for priors in calls) != len(results):
            raise RuntimeError(f'{type(self.head).__name__} decoded other rows than it '
                               'hands to NMS: its detections cannot be tagged')
        offsets = [0] + [len(grid) for grid in grids[:-1]]
        starts = torch.tensor(offsets, device=results.bboxes.device).cumsum(0)
        name = f'{type(self.head).__name__} priors'
        return torch.cat([start + match_rows(priors, grid, name)
                          for start, priors, grid in zip(starts, calls, grids)])

    def post_process(self, stock: Callable, results, *args, **kwargs):
        """NMS keeps rows of ``results`` (``multiclass_nms``'s indices, one per kept
        (row, class) pair); score voting then groups them per class."""
        kept: List[Tensor] = []

        def recording_nms(boxes, scores, *nms_args, **nms_kwargs):
            dets, labels, inds = multiclass_nms(boxes, scores, *nms_args,
                                                **dict(nms_kwargs, return_inds=True))
            kept.append(inds // (scores.shape[1] - 1))  # the last column: background
            return dets, labels

        def checked_voting(voting, det_bboxes, det_labels, *voting_args):
            voted, labels = voting(det_bboxes, det_labels, *voting_args)
            order = torch.sort(det_labels, stable=True).indices
            if not (torch.equal(labels, det_labels[order]) and
                    torch.equal(voted[:, -1], det_bboxes[order, -1])):
                raise RuntimeError(f'{type(self.head).__name__}.score_voting did not keep '
                                   'the detections grouped by class: they cannot be tagged')
            kept[-1] = kept[-1][order]
            return voted, labels

        tags = {key: results[key] for key in ('levels', 'expert_weights')}
        with method_wrapped(self.head, 'score_voting', checked_voting):
            nms_results = with_globals(stock.__func__, multiclass_nms=recording_nms)(
                self.head, results, *args, **kwargs)
        for key, value in tags.items():
            nms_results[key] = value[kept[-1]]
        nms_results.set_metainfo(results.metainfo)
        return nms_results


class CenterNetDecode(OwnDecode):
    """CenterNet: per image, the peaks of its one heatmap, in ``get_topk_from_heatmap``
    order; its ``predict`` runs no NMS and no ``_bbox_post_process``."""
    head_class = CenterNetHead
    methods = ('predict_by_feat', '_predict_by_feat_single', '_decode_heatmap')
    post_processes = False

    @contextmanager
    def recording(self) -> Iterator[None]:
        self.peaks: List[Tensor] = []

        def recording(scores, *args, **kwargs):
            result = get_topk_from_heatmap(scores, *args, **kwargs)
            self.peaks.append(result[1][0])  # (k,) pixel indices, (1, k) per image
            return result

        with method_seeing(self.head, '_decode_heatmap', get_topk_from_heatmap=recording):
            yield

    def level_priors(self, sizes: Sequence[torch.Size]) -> List[int]:
        return [size[0] * size[1] for size in sizes]  # a peak per pixel

    def rows(self, b: int, results) -> Tensor:
        if len(self.peaks[b]) != len(results):
            raise RuntimeError(f'{type(self.head).__name__} returned {len(results)} '
                               f'detections for {len(self.peaks[b])} peaks of image {b}: '
                               'they cannot be tagged')
        return self.peaks[b]


class YOLACTDecode(OwnDecode):
    """YOLACT: per image, its own top-k priors of each level, decoded at once by
    ``bbox_coder.decode``, then ``_bbox_post_process``'s ``fast_nms``, which returns
    rows of the decoded boxes with the score of their class and their mask
    coefficients, not indices. Clipped boxes of several priors tie, and so can the
    scores of a saturated classifier: a kept detection is the decoded row whose box,
    score in the detection's class and coefficients all equal its own, bit for bit."""
    head_class = YOLACTHead
    methods = ('predict_by_feat', '_predict_by_feat_single', '_bbox_post_process')
    post_processes = False  # its _bbox_post_process takes boxes, not InstanceData

    @contextmanager
    def recording(self) -> Iterator[None]:
        self.grids: List[List[Tensor]] = []
        self.decoded: List[Tensor] = []  # the priors of each image's decode
        self.nms_inputs: List[Tuple[Tensor, Tensor, Tensor]] = []  # per image
        # rescaling divides the decoded boxes in place: recorded after the call, they
        # are those NMS saw
        with recording_calls(self.head.prior_generator, 'grid_priors', self.grids), \
                recording_calls(self.head.bbox_coder, 'decode', self.decoded,
                                keep=lambda result, priors, *args, **kwargs: priors), \
                recording_calls(self.head, '_bbox_post_process', self.nms_inputs,
                                keep=lambda result, **kwargs: (kwargs['multi_bboxes'],
                                                               kwargs['multi_scores'],
                                                               kwargs['multi_coeffs'])):
            yield

    def rows(self, b: int, results) -> Tensor:
        boxes, scores, coeffs = self.nms_inputs[b]
        kept = torch.empty_like(results.labels)
        name = f'{type(self.head).__name__} rows (box, class score, coefficients)'
        for label in results.labels.unique():
            mine = results.labels == label
            kept[mine] = match_rows(
                torch.cat([results.bboxes[mine], results.scores[mine, None],
                           results.coeffs[mine]], dim=1),
                torch.cat([boxes, scores[:, label, None], coeffs], dim=1), name)
        return match_rows(self.decoded[b][kept], torch.cat(self.grids[-1]),
                          f'{type(self.head).__name__} priors')


class CornerDecode(OwnDecode):
    """CornerNet: corner pairs of the last feature level, one ``_predict_by_feat_single``
    per image, NMS inside it."""
    head_class = CornerHead
    methods = ('predict_by_feat', '_predict_by_feat_single')
    post_processes = False

    @contextmanager
    def recording(self) -> Iterator[None]:
        yield  # nothing to record: every detection comes from the last level

    def level_priors(self, sizes: Sequence[torch.Size]) -> List[int]:
        return [size[0] * size[1] for size in sizes]  # a corner per pixel

    def tags(self, b: int, results, gates, level_priors: Sequence[int]
             ) -> Tuple[Tensor, Tensor]:
        if gates.pixel_layers:
            raise UnmatchedRows(f'a detection of {type(self.head).__name__} pairs two '
                                'corners: the per-pixel gates of '
                                f'{gates.pixel_layers} have no one location to tag it')
        levels = torch.full((len(results), ), len(level_priors) - 1, dtype=torch.long,
                            device=results.bboxes.device)
        return levels, gates.level_weights(b, levels)


class CentripetalDecode(CornerDecode):
    head_class = CentripetalHead


OWN_DECODES = (YOLOXDecode, YOLOV3Decode, PAADecode, CenterNetDecode, YOLACTDecode,
               CornerDecode, CentripetalDecode)


def own_decode(head) -> Optional[OwnDecode]:
    """The reader of ``head``'s own decode, None where none reads it."""
    return next((cls(head) for cls in OWN_DECODES if cls.reads(head)), None)
