"""ExpertSizeStatsHook: per-expert gate statistics against object sizes (val / test)."""
import json
import os
import os.path as osp
from typing import List, Optional, Tuple

import numpy as np
from mmengine.dist import collect_results, is_main_process
from mmengine.hooks import Hook
from pycocotools import mask as mask_utils

from mmdet.registry import HOOKS

from ...analysis import (AREA_RANGES, BUCKET_NAMES, SCHEMA, SCHEMA_VERSION,
                         bucket_membership, conditional_nmi, layer_summary,
                         level_shuffled_nmi,
                         shuffled_nmi, specialisation_intervals)
from ...analysis.relative_scale import (absent, check_bins, relative_scale_stats,
                                        relative_scales)
from ...layers import assign_moe_names
from ...models import (MoEDetTTAModel, NoReferenceSizes, detector_reference_sizes,
                       untagged_layers_reason)
from .gate_recording import GateRecordingMixin, tta_model, unwrap
from .gate_rows import rows_by_layer
from .scalar_names import moe_scalar_name
from .ground_truth import GroundTruth


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def match_to_gt(boxes, scores, labels, gt_boxes, gt_labels, iou_thr) -> np.ndarray:
    """Greedy by score, one GT per detection and per class, as COCOeval: index or -1."""
    matched = np.full(len(boxes), -1)
    if not len(boxes) or not len(gt_boxes):
        return matched
    # COCOeval's own box IoU (no ground truth here is a crowd region)
    iou = mask_utils.iou(xyxy_to_xywh(boxes), xyxy_to_xywh(gt_boxes), [0] * len(gt_boxes))
    taken = np.zeros(len(gt_boxes), bool)
    for d in np.argsort(-scores, kind='stable'):
        candidates = np.where(~taken & (gt_labels == labels[d]) & (iou[d] >= iou_thr))[0]
        if len(candidates):
            g = candidates[iou[d, candidates].argmax()]
            taken[g] = True
            matched[d] = g
    return matched


@HOOKS.register_module()
class ExpertSizeStatsHook(GateRecordingMixin, Hook):
    """Which experts detect which object sizes (COCO small / medium / large).

    Active in the val and test loops only. For every MoE layer it accumulates

    - detection view: the gate weights that produced each kept detection
      (``score ≥ score_thr``), by the detection's size bucket (or, with
      ``match_gt``, only detections matching a GT box with IoU ≥ ``iou_thr``, by
      that box's bucket and class); mass (Σ weights) and counts (experts in the
      top-k). A MoE FPN neck conv counts the detections of the level it feeds
      (``num_detections`` per layer); ``detection_gates`` says whether the
      detections carried the layer's gates (``'tagged'``) or got their image's
      row (``'image'``: a layer no head tags, e.g. in a neck that is no FPN);
    - class view: the same by class; image view: per-image gates × the image's
      GT size histogram; level view: gate rows per FPN level (shared heads);
    - importance (Σ gate rows) for the importance CV and the living experts;
    - the normalised mutual information expert ↔ size and its chance level with
      the gate weights shuffled across detections;
    - the within-level scale measure (``relative_scale_bins`` quantile bins per FPN
      level, None: left out): NMI(expert; relative scale | level) of each
      detection's ``log2(√(w·h) / s_l)`` (the area the size buckets use, with
      ``match_gt`` its GT box's, times the image's ``scale_factor``: s_l, from
      :func:`~mmdet_moe.models.detector_reference_sizes`, is in network-input
      pixels), its bootstrap
      interval and baselines shuffled within each (image, level) and each level
      (:mod:`mmdet_moe.analysis.relative_scale`); detectors whose detections carry
      no FPN level (two-stage) get the reason instead.

    Sums are gathered over ranks with images padded in by the sampler dropped, and
    written to ``<work_dir>/expert_size_stats/{val_epoch_<e>,test}.json`` and
    ``<work_dir>/expert_size_stats.json`` (latest); headline scalars go to the
    message hub, logged as ``moe_val/<layer>.nmi`` (``image_nmi`` when no detection
    counted), ``.nmi_given_level``, ``.nmi_rel_scale_given_level``,
    ``.living_experts`` and ``.importance_cv``
    (``moe_test/...`` in the test loop; see :mod:`.scalar_names`) for LoggerHook and
    the visualizer backends.
    """
    priority = 'NORMAL'  # before LoggerHook (BELOW_NORMAL) prints the epoch's scalars

    def __init__(self, score_thr: float = 0.3, match_gt: bool = False,
                 iou_thr: float = 0.5, shuffle_permutations: int = 20, seed: int = 0,
                 bootstrap_resamples: int = 1000, relative_scale_bins: Optional[int] = 4):
        if not 0 <= score_thr <= 1:
            raise ValueError(f'score_thr must be in [0, 1], got {score_thr!r}')
        if not 0 < iou_thr <= 1:
            raise ValueError(f'iou_thr must be in (0, 1], got {iou_thr!r}')
        if not isinstance(bootstrap_resamples, int) or bootstrap_resamples < 0:
            raise ValueError(f'bootstrap_resamples must be an int >= 0 (0: no intervals), '
                             f'got {bootstrap_resamples!r}')
        self.score_thr, self.match_gt, self.iou_thr = score_thr, match_gt, iou_thr
        self.shuffle_permutations, self.seed = shuffle_permutations, seed
        check_bins(relative_scale_bins)
        self.bootstrap_resamples = bootstrap_resamples
        self.relative_scale_bins = relative_scale_bins
        # s_l per FPN level, or why the detections have none (set in before_run)
        self._reference_sizes: Optional[List[float]] = None
        self._no_reference = 'the reference sizes are read in before_run, which did not run'
        self._images: List[dict] = []
        self._tta = False
        self._gate_of: dict = {}
        self._untagged_reason: Optional[str] = None  # why some layers keep image rows

    def before_run(self, runner) -> None:
        tta = tta_model(runner.model)
        if tta is not None and not isinstance(tta, MoEDetTTAModel):
            raise ValueError(
                f'ExpertSizeStatsHook: test-time augmentation with {type(tta).__name__} '
                'drops the FPN level and view of each merged detection, so its gate '
                'weights cannot be found; set tta_model = dict(type=\'MoEDetTTAModel\', '
                'tta_cfg=...) in the config (it merges as DetTTAModel and keeps them)')
        self._tta = tta is not None
        model = unwrap(runner.model)
        self.layer_names = assign_moe_names(model)
        self._untagged_reason = untagged_layers_reason(model)
        try:
            self._reference_sizes = detector_reference_sizes(model)
        except NoReferenceSizes as err:
            self._reference_sizes, self._no_reference = None, str(err)
        # a layer reusing another's routing decision (a head's reg MoE with
        # moe_branches='shared') records nothing: it is reported under that layer
        gates = {name: getattr(model.get_submodule(name), 'gate', None)
                 for name in self.layer_names}
        self._gate_of = {name: id(gate) if gate is not None else name
                         for name, gate in gates.items()}
        if not self.layer_names:
            raise ValueError(f'ExpertSizeStatsHook: the model '
                             f'({type(unwrap(runner.model)).__name__}) has no MoE layer; '
                             'remove the hook or add MoE layers')

    # loop plumbing ---------------------------------------------------------------
    def before_val_epoch(self, runner) -> None:
        self._start(runner, runner.val_loop.dataloader.dataset)

    def before_test_epoch(self, runner) -> None:
        self._start(runner, runner.test_loop.dataloader.dataset)

    def before_val_iter(self, runner, batch_idx, data_batch=None) -> None:
        self.recorder.clear()

    before_test_iter = before_val_iter

    def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        # test-time augmentation runs the model once per view: inputs[view][image]
        self._collect(outputs, len(data_batch['inputs']) if self._tta else 1)

    after_test_iter = after_val_iter

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._finish(runner, f'val_epoch_{runner.epoch}', 'val', metrics)

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._finish(runner, 'test', 'test', metrics)

    def _start(self, runner, dataset) -> None:
        self._dataset = dataset
        self._classes = list(dataset.metainfo.get('classes', ()))
        self._gt = GroundTruth(dataset)
        self._images = []
        self.start_recording(runner)

    # per batch -------------------------------------------------------------------
    def _collect(self, outputs, num_views: int = 1) -> None:
        layers = rows_by_layer(self.recorder, num_views, len(outputs))
        for b, sample in enumerate(outputs):
            self._images.append(self._image_record(b, sample, layers))

    def _image_record(self, b: int, sample, layers) -> dict:
        gt_boxes, gt_areas, gt_labels = self._gt(sample)
        pred = sample.pred_instances
        keep = (pred.scores >= self.score_thr).cpu().numpy()
        boxes = pred.bboxes.cpu().numpy()[keep].astype(np.float64)
        scores = pred.scores.cpu().numpy()[keep]
        labels = pred.labels.cpu().numpy()[keep]
        levels = pred.levels.cpu().numpy()[keep] if 'levels' in pred else None
        views = pred.views.cpu().numpy()[keep] if 'views' in pred else None
        # the gate weights a head tagged each detection with (per-pixel gates: its
        # prior's location), for the layers it names
        tagged = pred.metainfo.get('expert_layers', []) if 'expert_weights' in pred else []
        tags = pred.expert_weights.cpu().numpy()[keep] if tagged else None
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        if self.match_gt:
            matched = match_to_gt(boxes, scores, labels, gt_boxes, gt_labels, self.iou_thr)
            hit = matched >= 0
            areas, labels = gt_areas[matched[hit]], gt_labels[matched[hit]]
            levels = None if levels is None else levels[hit]
            views = None if views is None else views[hit]
            tags = None if tags is None else tags[hit]
        else:
            hit = np.ones(len(boxes), bool)
        # s_l is in network-input pixels: the same area, resized as the image was
        sx, sy = sample.metainfo.get('scale_factor', (1.0, 1.0))
        scales = (relative_scales(areas * sx * sy, levels, self._reference_sizes)
                  if levels is not None and self._reference_sizes is not None else None)
        record = dict(img_id=sample.metainfo['img_id'], num_detections=int(hit.sum()),
                      gt_buckets=bucket_membership(gt_areas).sum(0),
                      det_buckets=bucket_membership(areas), det_labels=labels,
                      det_levels=levels, det_relative_scales=scales, layers={})
        for name, layer in layers.items():
            image_row = layer.image_row(b)
            # tags are as wide as the head's largest layer: this layer's N columns
            det_weights = (tags[:, tagged.index(name), :len(image_row)] if name in tagged
                           else layer.detection_rows(b, levels, views, len(areas)))
            record['layers'][name] = dict(
                det_weights=det_weights.astype(np.float32), tagged=name in tagged,
                image_row=image_row, level_rows=layer.call_rows(b))
        return record

    # per epoch -------------------------------------------------------------------
    def _finish(self, runner, tag: str, mode: str, metrics: Optional[dict]) -> None:
        # a test run's runner.epoch would build the train loop and load its dataset
        epoch, iteration = (runner.epoch, runner.iter) if mode == 'val' else (0, 0)
        try:
            stats = self.gather_and_summarise(mode, epoch, iteration)
        finally:
            self.stop_recording()
            self._images = []
        if stats is None:  # not the main process
            return
        # the loop's evaluation (e.g. COCO AP), for comparisons across runs
        stats['metrics'] = {k: float(v) for k, v in (metrics or {}).items()
                            if isinstance(v, (int, float))}
        if stats['num_images'] == 0:
            runner.logger.warning('ExpertSizeStatsHook: the dataset has no image; the '
                                  'statistics are empty')
        elif stats['num_detections'] == 0:
            runner.logger.warning(f'ExpertSizeStatsHook: no detection with score >= '
                                  f'{self.score_thr}; only the image view has data')
        write_stats(stats, runner.work_dir, tag)
        untagged = [n for n, layer in stats['layers'].items()
                    if layer.get('detection_gates') == 'image']
        if untagged and stats['num_detections']:
            reason = self._untagged_reason or 'detections not tagged'
            runner.logger.warning(f'ExpertSizeStatsHook: {reason}; untagged layers: '
                                  f'{", ".join(untagged)}')
        for name, layer in stats['layers'].items():
            summary = layer_summary(layer, BUCKET_NAMES)
            scalars = {key: summary[key] for key in (
                'nmi_given_level', 'nmi_rel_scale_given_level', 'living_experts',
                'importance_cv')}
            # without detections the NMI is the image view's, another quantity
            scalars['nmi' if summary['view'] == 'detection' else 'image_nmi'] = summary['nmi']
            for key, value in scalars.items():
                if value is not None:
                    runner.message_hub.update_scalar(moe_scalar_name(mode, name, key), value)

    def gather_and_summarise(self, mode: str, epoch: int, iteration: int) -> Optional[dict]:
        """Gather the per-image records of all ranks (dropping images the sampler
        padded in) and sum them; returns None on ranks other than the main one."""
        images = collect_results(self._images, len(self._dataset), device='cpu')
        if not is_main_process():
            return None
        unique = {}
        for image in images:
            unique.setdefault(image['img_id'], image)
        return self.summarise(list(unique.values()), mode, epoch, iteration)

    def summarise(self, images: List[dict], mode: str, epoch: int, iteration: int) -> dict:
        """Sum per-image records into the ``expert_size_stats.json`` structure."""
        layers, shared = self._layer_tables(images) if images else ({}, {})
        return dict(
            schema=SCHEMA, version=SCHEMA_VERSION, mode=mode, epoch=epoch, iter=iteration,
            size_buckets=dict(names=list(BUCKET_NAMES), area_ranges=[list(r) for r in AREA_RANGES],
                              inclusive='both ends, as pycocotools areaRng'),
            classes=self._classes, score_thr=self.score_thr, match_gt=self.match_gt,
            iou_thr=self.iou_thr, num_images=len(images),
            num_detections=int(sum(img['num_detections'] for img in images)),
            gt_per_bucket=np.sum([img['gt_buckets'] for img in images], axis=0).tolist()
            if images else [0, 0, 0],
            layers=layers, shared_routing=shared)

    def _layer_tables(self, images: List[dict]) -> Tuple[dict, dict]:
        """Expert × size / class / level tables of every MoE layer that routed (images
        non-empty), and the layers that reuse another's routing (see _routing_layers)."""
        # per detection, the same for every layer
        buckets = np.concatenate([img['det_buckets'] for img in images]).astype(np.float64)
        labels = np.concatenate([img['det_labels'] for img in images]).astype(np.int64)
        num_classes = len(self._classes)
        one_hot = np.eye(num_classes)[labels] if num_classes else np.zeros((len(labels), 0))
        gt_hist = np.stack([img['gt_buckets'] for img in images]).astype(np.float64)
        # FPN level of every detection, when the head tags them (MoERetinaHead)
        with_levels = all(img['det_levels'] is not None for img in images)
        det_levels = (np.concatenate([img['det_levels'] for img in images]).astype(np.int64)
                      if with_levels else np.zeros(len(labels), np.int64))
        num_levels = int(det_levels.max(initial=0)) + 1
        image_of = np.repeat(np.arange(len(images)), [len(img['det_labels']) for img in images])
        # the detections of one (image, level) share a gate row: baselines move them
        # together (sizes cluster per image; single detections are not independent)
        groups = image_of * num_levels + det_levels
        layers = {}
        routing, shared = self._routing_layers(images)
        for name in routing:
            per_image = [img['layers'][name] for img in images]
            weights = np.concatenate([p['det_weights'] for p in per_image]).astype(np.float64)
            # a MoE neck conv tags only the detections of the level it feeds, the
            # others get a zero row (a gate row sums to 1): count it over those it
            # fed, so that its baselines shuffle rows among them alone
            fed = weights.sum(axis=1) > 0
            weights = weights[fed]
            level_rows = np.stack([p['level_rows'] for p in per_image])  # (images, calls, N)
            image_rows = np.stack([p['image_row'] for p in per_image])
            layers[name] = dict(
                num_experts=int(image_rows.shape[1]),
                # 'tagged': each detection carried this layer's gates; 'image': it got
                # its image's row (a layer the heads cannot tag, e.g. a non-FPN neck)
                detection_gates='tagged' if all(p['tagged'] for p in per_image) else 'image',
                num_detections=int(fed.sum()),
                detection=dict(mass=(weights.T @ buckets[fed]).tolist(),
                               count=((weights > 0).T.astype(np.float64) @ buckets[fed])
                               .tolist()),
                classes=dict(mass=(weights.T @ one_hot[fed]).tolist(),
                             count=((weights > 0).T.astype(np.float64) @ one_hot[fed])
                             .tolist()),
                image=dict(mass=(image_rows.T @ gt_hist).tolist()),
                levels=(dict(mass=level_rows.sum(0).T.tolist(), rows=int(len(level_rows)))
                        if level_rows.shape[1] > 1 else None),
                importance=level_rows.sum((0, 1)).tolist(),
                rows=int(level_rows.shape[0] * level_rows.shape[1]),
                nmi_shuffled=shuffled_nmi(weights, buckets[fed], len(BUCKET_NAMES),
                                          self.shuffle_permutations, self.seed, groups[fed]))
            layers[name].update(self._level_controlled(
                weights, buckets[fed], det_levels[fed], num_levels, image_of[fed],
                groups[fed], len(images), with_levels))
            layers[name]['relative_scale'] = self._relative_scale(
                images, fed, weights, det_levels[fed], num_levels, image_of[fed], groups[fed])
        return layers, shared

    def _relative_scale(self, images, fed, weights, levels, num_levels, image_of,
                        groups) -> dict:
        """The layer's ``relative_scale`` object over the detections it ``fed`` (a
        mask over all counted detections), or the reason it is absent."""
        if self.relative_scale_bins is None:
            return absent('left out (relative_scale_bins=None)')
        if any(img['det_levels'] is None for img in images):
            return absent('the head does not tag its detections with their FPN level')
        if self._reference_sizes is None:
            return absent(self._no_reference)
        if weights.sum() <= 0:
            return absent(f'no detection counted (score >= {self.score_thr}'
                          + (', matching a GT box)' if self.match_gt else ')'))
        scales = np.concatenate([img['det_relative_scales'] for img in images])[fed]
        # one entry per level of the head, also for the top levels no detection reached
        return relative_scale_stats(
            weights, scales, levels, max(num_levels, len(self._reference_sizes)), image_of, groups, len(images),
            self.relative_scale_bins, self._reference_sizes, self.shuffle_permutations,
            self.seed, self.bootstrap_resamples)

    def _level_controlled(self, weights, buckets, levels, num_levels, image_of, groups,
                          num_images, with_levels) -> dict:
        """The expert × size × level table, the level-conditioned NMI's within-level
        shuffled baseline, and bootstrap intervals over images (detections of one
        image stay together)."""
        per_image = np.zeros((num_images, weights.shape[1], buckets.shape[1], num_levels))
        np.add.at(per_image, (image_of,), np.einsum('ne,ns,nl->nesl', weights, buckets,
                                                   np.eye(num_levels)[levels]))
        counted = weights.sum() > 0
        return dict(
            detection_levels=dict(mass=per_image.sum(0).tolist()) if with_levels else None,
            nmi_given_level=conditional_nmi(per_image.sum(0)) if with_levels else None,
            nmi_given_level_shuffled=level_shuffled_nmi(
                weights, buckets, levels, num_levels, self.shuffle_permutations, self.seed,
                groups)
            if with_levels else None,
            intervals=specialisation_intervals(per_image, self.bootstrap_resamples,
                                               self.seed, with_levels)
            if counted and self.bootstrap_resamples else None)

    def _routing_layers(self, images: List[dict]) -> Tuple[List[str], dict]:
        """The MoE layers that routed, and ``{layer: the layer whose routing it
        reuses}`` for those that recorded nothing because they share its gate."""
        recorded = [n for n in self.layer_names if any(n in img['layers'] for img in images)]
        for name in recorded:
            missing = sum(name not in img['layers'] for img in images)
            if missing:
                raise RuntimeError(f'ExpertSizeStatsHook: MoE layer {name} routed on some '
                                   f'images but not on {missing} others')
        shared = {}
        for name in self.layer_names:
            if name not in recorded:
                gate = self._gate_of.get(name, name)
                owner = [n for n in recorded if self._gate_of.get(n, n) == gate]
                if not owner:
                    raise RuntimeError(
                        f'ExpertSizeStatsHook: MoE layer {name} recorded no gate rows in '
                        'the whole loop: it neither routed nor shares the gate of a layer '
                        'that did (is it used in predict?)')
                shared[name] = owner[0]
        return recorded, shared


def write_stats(stats: dict, work_dir: str, tag: str) -> str:
    """Write atomically to ``expert_size_stats/<tag>.json`` and the latest copy."""
    out_dir = osp.join(work_dir, 'expert_size_stats')
    os.makedirs(out_dir, exist_ok=True)
    path = osp.join(out_dir, f'{tag}.json')
    for target in (path, osp.join(work_dir, 'expert_size_stats.json')):
        tmp = target + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(stats, f, indent=1)
        os.replace(tmp, target)
    return path
