"""MoE in every detector family of mmdet 3.3: a census.

For one stock config per family (:data:`FAMILIES`, shipped with mmdet's wheel under
``mmdet/.mim/configs``), MoE goes in three ways, as a user writes them:

- ``neck``: ``conv_cfg=dict(type='MoEConv2d', ...)`` on the (first) neck;
- ``head conv``: a ``MoEDetector`` path into one conv of the dense head (the first
  conv of its classification tower, else its first 3×3 conv; the RPN of a
  two-stage detector);
- ``subnet``: ``expert='subnet'`` on the head's classification tower.

Each form is built (4 experts, top-2, importance loss 0.5), trained one step on two
random images (the loss dict must be finite and hold ``loss_moe_importance``) and
predicts (every score threshold 0, so an untrained model keeps detections), and the
detections are checked for tags (``expert_weights``); ``ExpertSizeStatsHook`` then
computes its statistics from one test iteration, driven as the test loop drives it
(:func:`statistics`), and must find every layer tagged where the detections are. The stock backbone is kept,
without pretrained weights, at a small image size. An outcome is one of:

- ``tagged``: trains, predicts, and the detections carry their experts' gates (a
  row of zeros where a layer did not feed a detection; some must be fed);
- ``per-image``: trains and predicts; the statistics keep per-image rows (the head
  says why in one line);
- ``refused``: the build refuses the insertion, naming what to write instead;
- ``n/a``: the family has no such place (no neck with ``conv_cfg``, no head conv,
  no tower);
- ``CRASH``: fails after building. The census target is none.

Usage::

    python tools/moe_census.py                       # all families, prints the table
    python tools/moe_census.py --families ssd yolox  # some
    python tools/moe_census.py --out docs/census.md  # the docs page's table
"""
import argparse
import copy
import json
import logging
import os.path as osp
import re
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

#: family → (config under mmdet/.mim/configs, image size)
FAMILIES: Dict[str, Tuple[str, int]] = {
    'atss': ('atss/atss_r50_fpn_1x_coco.py', 128),
    'autoassign': ('autoassign/autoassign_r50-caffe_fpn_1x_coco.py', 128),
    'carafe': ('carafe/faster-rcnn_r50_fpn-carafe_1x_coco.py', 128),
    'cascade_rcnn': ('cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py', 128),
    'cascade_rpn': ('cascade_rpn/cascade-rpn_faster-rcnn_r50-caffe_fpn_1x_coco.py', 128),
    'centernet': ('centernet/centernet_r18_8xb16-crop512-140e_coco.py', 128),
    'centernet_update': ('centernet/centernet-update_r50-caffe_fpn_ms-1x_coco.py', 128),
    'centripetalnet': ('centripetalnet/centripetalnet_hourglass104_16xb6-crop511-210e-'
                       'mstest_coco.py', 128),
    'condinst': ('condinst/condinst_r50_fpn_ms-poly-90k_coco_instance.py', 128),
    'conditional_detr': ('conditional_detr/conditional-detr_r50_8xb2-50e_coco.py', 128),
    'cornernet': ('cornernet/cornernet_hourglass104_8xb6-210e-mstest_coco.py', 128),
    'dab_detr': ('dab_detr/dab-detr_r50_8xb2-50e_coco.py', 128),
    'ddod': ('ddod/ddod_r50_fpn_1x_coco.py', 512),  # its DCN needs P7 ≥ 3×3
    'ddq': ('ddq/ddq-detr-4scale_r50_8xb2-12e_coco.py', 256),
    'deformable_detr': ('deformable_detr/deformable-detr_r50_16xb2-50e_coco.py', 128),
    'detectors': ('detectors/detectors_cascade-rcnn_r50_1x_coco.py', 128),
    'detr': ('detr/detr_r50_8xb2-150e_coco.py', 128),
    'dino': ('dino/dino-4scale_r50_8xb2-12e_coco.py', 256),  # 900 queries ≤ tokens
    'double_heads': ('double_heads/dh-faster-rcnn_r50_fpn_1x_coco.py', 128),
    'dyhead': ('dyhead/atss_r50_fpn_dyhead_1x_coco.py', 128),
    'dynamic_rcnn': ('dynamic_rcnn/dynamic-rcnn_r50_fpn_1x_coco.py', 128),
    'efficientnet': ('efficientnet/retinanet_effb3_fpn_8xb4-crop896-1x_coco.py', 128),
    'faster_rcnn': ('faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', 128),
    'fcos': ('fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py', 128),
    'foveabox': ('foveabox/fovea_r50_fpn_4xb4-1x_coco.py', 128),
    'fpg': ('fpg/retinanet_r50_fpg_crop640_50e_coco.py', 128),
    'free_anchor': ('free_anchor/freeanchor_r50_fpn_1x_coco.py', 128),
    'fsaf': ('fsaf/fsaf_r50_fpn_1x_coco.py', 128),
    'gfl': ('gfl/gfl_r50_fpn_1x_coco.py', 128),
    'ghm': ('ghm/retinanet_r50_fpn_ghm-1x_coco.py', 128),
    'grid_rcnn': ('grid_rcnn/grid-rcnn_r50_fpn_gn-head_1x_coco.py', 128),
    'groie': ('groie/faste-rcnn_r50_fpn_groie_1x_coco.py', 128),
    'guided_anchoring': ('guided_anchoring/ga-retinanet_r50_fpn_1x_coco.py', 128),
    'htc': ('htc/htc-without-semantic_r50_fpn_1x_coco.py', 128),
    'lad': ('lad/lad_r50-paa-r101_fpn_2xb8_coco_1x.py', 128),
    'ld': ('ld/ld_r18-gflv1-r101_fpn_1x_coco.py', 128),
    'libra_rcnn': ('libra_rcnn/libra-faster-rcnn_r50_fpn_1x_coco.py', 128),
    'mask_rcnn': ('mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', 128),
    'ms_rcnn': ('ms_rcnn/ms-rcnn_r50-caffe_fpn_1x_coco.py', 128),
    'nas_fcos': ('nas_fcos/nas-fcos_r50-caffe_fpn_nashead-gn-head_4xb4-1x_coco.py', 128),
    'nas_fpn': ('nas_fpn/retinanet_r50_nasfpn_crop640-50e_coco.py', 128),
    'paa': ('paa/paa_r50_fpn_1x_coco.py', 128),
    'pafpn': ('pafpn/faster-rcnn_r50_pafpn_1x_coco.py', 128),
    'pisa': ('pisa/faster-rcnn_r50_fpn_pisa_1x_coco.py', 128),
    'point_rend': ('point_rend/point-rend_r50-caffe_fpn_ms-1x_coco.py', 128),
    'queryinst': ('queryinst/queryinst_r50_fpn_1x_coco.py', 128),
    'reppoints': ('reppoints/reppoints-moment_r50_fpn_1x_coco.py', 128),
    'retinanet': ('retinanet/retinanet_r50_fpn_1x_coco.py', 128),
    'rpn': ('rpn/rpn_r50_fpn_1x_coco.py', 128),
    'rtmdet': ('rtmdet/rtmdet_tiny_8xb32-300e_coco.py', 128),
    'sabl': ('sabl/sabl-retinanet_r50_fpn_1x_coco.py', 128),
    'scnet': ('scnet/scnet_r50_fpn_1x_coco.py', 128),
    'sparse_rcnn': ('sparse_rcnn/sparse-rcnn_r50_fpn_1x_coco.py', 128),
    'ssd': ('ssd/ssd300_coco.py', 320),
    'tood': ('tood/tood_r50_fpn_1x_coco.py', 128),
    'tridentnet': ('tridentnet/tridentnet_r50-caffe_1x_coco.py', 128),
    'vfnet': ('vfnet/vfnet_r50_fpn_1x_coco.py', 128),
    'yolact': ('yolact/yolact_r50_1xb8-55e_coco.py', 128),
    'yolo': ('yolo/yolov3_d53_8xb8-320-273e_coco.py', 128),
    'yolof': ('yolof/yolof_r50-c5_8xb8-1x_coco.py', 128),
    'yolox': ('yolox/yolox_tiny_8xb8-300e_coco.py', 128),
}

# What the stock model needs to run here at all, each a defect of mmdet 3.3 itself:
# TridentNet's TridentConv allocates its weights with torch.Tensor() and only a
# checkpoint fills them (without one they hold stale memory, up to 1e18: features
# overflow, and the gate's logits, the balance loss and every loss go NaN, flakily);
# SSD's predict reads a loss_cls SSDHead never builds (mmdet issue 11063).
CONFIG_FIXES = {
    'tridentnet': lambda model: model.backbone.update(init_cfg=[
        dict(type='Kaiming', layer=['Conv2d', 'TridentConv']),
        dict(type='Constant', val=1, layer=['_BatchNorm', 'GroupNorm'])]),
}
MODEL_FIXES = {
    'ssd': lambda model: setattr(model.bbox_head, 'loss_cls', None),
}

# The head convs of a family whose first conv need not feed a detection: SSD has one
# conv per level, and an untrained model's detections may all come from other levels
# than the first, so each level's conv is a MoE conv; CornerNet decodes its last
# Hourglass stack's level only (the first stack's head modules serve its intermediate
# supervision in training), so the conv is one of the last level's (of its heatmap
# branch: an untrained MoE conv in the corner pooling, which the corner embeddings
# also read, left no pair of corners to detect)
HEAD_CONVS = {
    'ssd': 'bbox_head.cls_convs.*.0',
    'cornernet': 'bbox_head.tl_heat.1.0.conv',
    'centripetalnet': 'bbox_head.tl_heat.1.0.conv',
}

FORMS = ('neck', 'head conv', 'subnet')
MOE = dict(num_experts=4, top_k=2, balance_cfg=dict(importance=0.5))
HEADS = ('bbox_head', 'rpn_head')


@dataclass
class Outcome:
    status: str  # tagged, per-image, refused, n/a, CRASH
    detail: str = ''

    def cell(self) -> str:
        return self.status if not self.detail or self.status == 'tagged' else \
            f'{self.status}: {self.detail}'


@dataclass
class FamilyResult:
    family: str
    config: str
    forms: Dict[str, Outcome] = field(default_factory=dict)
    stock: str = 'ok'  # the stock model's own run: 'ok' or its error
    seconds: float = 0.0

    @property
    def tagged(self) -> bool:
        return any(o.status == 'tagged' for o in self.forms.values())

    @property
    def crashed(self) -> bool:
        return any(o.status == 'CRASH' for o in self.forms.values())


def _is_pretrained(cfg) -> bool:
    return isinstance(cfg, dict) and cfg.get('type') in ('Pretrained', 'PretrainedInit')


def _no_pretrained(cfg) -> None:
    """Drop every pretrained checkpoint a config names (no internet, no files)."""
    if isinstance(cfg, dict):
        for key in list(cfg):
            if key in ('pretrained', 'teacher_ckpt') or _is_pretrained(cfg[key]):
                cfg[key] = None
            else:
                _no_pretrained(cfg[key])
    elif isinstance(cfg, list):
        cfg[:] = [value for value in cfg if not _is_pretrained(value)]
        for value in cfg:
            _no_pretrained(value)


def _zero_score_thresholds(cfg) -> None:
    """Every ``score_thr`` of the test settings to 0: an untrained model's scores."""
    if isinstance(cfg, dict):
        for key in list(cfg):
            if key in ('score_thr', 'score_threshold', 'min_score'):
                cfg[key] = 0.0
            else:
                _zero_score_thresholds(cfg[key])
    elif isinstance(cfg, list):
        for value in cfg:
            _zero_score_thresholds(value)


def stock_model_cfg(family: str):
    """The family's stock ``model`` config, with no pretrained weights, no batch
    augments and score thresholds 0."""
    import mmdet
    from mmengine.config import Config
    path = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', FAMILIES[family][0])
    model = Config.fromfile(path).model
    if isinstance(model.get('teacher_config'), str):  # LD, LAD: a path from mmdet's root
        model.teacher_config = osp.join(osp.dirname(mmdet.__file__), '.mim',
                                        model.teacher_config)
    _no_pretrained(model)
    if family in CONFIG_FIXES:
        CONFIG_FIXES[family](model)
    if 'data_preprocessor' in model:
        model.data_preprocessor.pop('batch_augments', None)
    for key in ('test_cfg', 'detector'):
        if key in model:
            _zero_score_thresholds(model[key])
    for head in ('bbox_head', 'rpn_head', 'roi_head'):
        if head in model and isinstance(model[head], dict):
            _zero_score_thresholds(model[head].get('test_cfg', {}))
    return model


def _dense_head(model: nn.Module) -> Optional[str]:
    for name in HEADS:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    return None


def head_conv_path(model: nn.Module) -> Optional[str]:
    """The conv a user names first: the first conv of the dense head's classification
    tower, else its first 3×3 conv."""
    head = _dense_head(model)
    if head is None:
        return None
    convs = [(n, m) for n, m in getattr(model, head).named_modules()
             if type(m) is nn.Conv2d]
    for name, conv in convs:
        if name.startswith('cls_convs.'):
            return f'{head}.{name}'
    for name, conv in convs:
        if conv.kernel_size == (3, 3):
            return f'{head}.{name}'
    return f'{head}.{convs[0][0]}' if convs else None


def subnet_path(model: nn.Module) -> Optional[str]:
    head = _dense_head(model)
    tower = getattr(getattr(model, head), 'cls_convs', None) if head else None
    if isinstance(tower, (nn.ModuleList, nn.Sequential)) and len(tower):
        return f'{head}.cls_convs'
    return None


def moe_model_cfg(family: str, stock, form: str, dense: nn.Module):
    """The stock config with MoE inserted by ``form``; None where it has no place."""
    cfg = copy.deepcopy(stock)
    if form == 'neck':
        if not cfg.get('neck'):
            return None
        neck = cfg.neck[0] if isinstance(cfg.neck, list) else cfg.neck
        neck.conv_cfg = dict(type='MoEConv2d', **MOE)
        return cfg
    path = (HEAD_CONVS.get(family) or head_conv_path(dense)) if form == 'head conv' \
        else subnet_path(dense)
    if path is None:
        return None
    spec = dict(paths=path, **MOE)
    if form == 'subnet':
        spec['expert'] = 'subnet'
    detector_type = cfg.pop('type')
    return dict(type='MoEDetector', detector_type=detector_type, moe_layers=[spec],
                **cfg)


def _inputs(model: nn.Module, size: int, training: bool):
    """Two random images with three boxes each (and masks, a semantic map, where the
    model learns them)."""
    from mmdet.testing import demo_mm_inputs
    roi_head = getattr(model, 'roi_head', None)
    masks = hasattr(model, 'mask_head') or getattr(roi_head, 'with_mask', False)
    semantic = getattr(roi_head, 'with_semantic', False)
    packed = demo_mm_inputs(2, [[3, size, size]] * 2, num_items=[3, 3], num_classes=2,
                            with_mask=bool(masks), with_semantic=bool(semantic))
    for sample in packed['data_samples']:  # class 0: every family has one
        sample.gt_instances.labels.zero_()
    return model.data_preprocessor(packed, training)


def _first_line(err: BaseException) -> str:
    text = f'{type(err).__name__}: {err}'.strip().splitlines()[0]
    return re.sub(r'\s+', ' ', text)[:160]


def train_and_predict(model: nn.Module, size: int):
    """A prediction, one training step on two images and a prediction again: the loss
    dict and the detections of the later prediction that has any (some stock models,
    e.g. RTMDet, keep no valid box after one step from their initialisation)."""
    def predict():
        model.eval()
        with torch.no_grad():
            return model(**_inputs(model, size, False), mode='predict')

    torch.manual_seed(0)
    before = predict()
    model.train()
    losses = model(**_inputs(model, size, True), mode='loss')
    total = sum(sum(v) if isinstance(v, (list, tuple)) else v
                for k, v in losses.items() if 'loss' in k)
    total.backward()
    after = predict()
    return losses, after if any(len(r.pred_instances) for r in after) else before


class RandomImages(list):
    """The census's test set as the statistics hook sees it: two images of the
    detector's classes, with no annotation file (ground truth from the samples)."""

    def __init__(self, num_classes: int):
        super().__init__([None, None])
        self.metainfo = dict(classes=tuple(f'class {i}' for i in range(num_classes)))


def statistics(model: nn.Module, size: int) -> Tuple[dict, List[str]]:
    """What ``ExpertSizeStatsHook`` writes (``expert_size_stats.json``) and warns for
    one test iteration of ``model`` on two random images: its loop methods, called
    as mmengine's test loop calls them."""
    from mmdet_moe.engine.hooks import ExpertSizeStatsHook
    hook, warnings = ExpertSizeStatsHook(score_thr=0.0), []
    num_classes = max(getattr(m, 'num_classes', 0) or 0 for m in model.modules())
    with tempfile.TemporaryDirectory() as work_dir:
        runner = SimpleNamespace(
            model=model, work_dir=work_dir, epoch=0, iter=0,
            logger=SimpleNamespace(warning=warnings.append, info=lambda *args: None),
            message_hub=SimpleNamespace(update_scalar=lambda *args, **kwargs: None),
            test_loop=SimpleNamespace(dataloader=SimpleNamespace(
                dataset=RandomImages(num_classes))))
        hook.before_run(runner)
        hook.before_test_epoch(runner)
        hook.before_test_iter(runner, 0)
        model.eval()
        data = _inputs(model, size, False)
        with torch.no_grad():
            outputs = model(**data, mode='predict')
        hook.after_test_iter(runner, 0, data_batch=data, outputs=outputs)
        hook.after_test_epoch(runner, metrics={})
        with open(osp.join(work_dir, 'expert_size_stats.json')) as f:
            return json.load(f), warnings


def _non_finite(losses) -> List[str]:
    return [k for k, v in losses.items() if 'loss' in k and not all(
        torch.isfinite(t).all() for t in (v if isinstance(v, (list, tuple)) else [v]))]


@contextmanager
def quiet():
    """mmdet's scope, the plugin, an epoch for heads that read it, and mmengine's logger
    at WARNING (init_weights lists every parameter), restored afterwards."""
    from mmengine.logging import MessageHub, MMLogger
    from mmengine.registry import init_default_scope
    import mmdet_moe  # noqa: F401
    init_default_scope('mmdet')
    MessageHub.get_current_instance().update_info('epoch', 0)
    MessageHub.get_current_instance().update_info('iter', 0)
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_detector(family: str, cfg) -> nn.Module:
    """Build (a copy of: some detectors edit their config) and initialise, seeded."""
    from mmdet.registry import MODELS
    torch.manual_seed(0)
    with quiet():
        model = MODELS.build(copy.deepcopy(cfg))
        if family in MODEL_FIXES:
            MODEL_FIXES[family](model)
        model.init_weights()
    return model


def run_form(family: str, stock, form: str, dense: nn.Module) -> Outcome:
    """Build, train one step, predict; the outcome of one insertion form."""
    cfg = moe_model_cfg(family, stock, form, dense)
    if cfg is None:
        return Outcome('n/a')
    try:
        model = build_detector(family, cfg)
    except (TypeError, ValueError) as err:
        # the plugin's refusals are ValueErrors; a TypeError only with its hint
        if isinstance(err, ValueError) or 'MoEDetector' in str(err):
            return Outcome('refused', _first_line(err))
        return Outcome('CRASH', 'at build: ' + _first_line(err) + ' @ ' + _where(err))
    except Exception as err:  # noqa: BLE001  (e.g. a head's init_weights)
        return Outcome('CRASH', 'at build: ' + _first_line(err) + ' @ ' + _where(err))
    try:
        losses, results = train_and_predict(model, FAMILIES[family][1])
    except Exception as err:  # noqa: BLE001  (the census records every failure)
        return Outcome('CRASH', _first_line(err) + ' @ ' + _where(err))
    if 'loss_moe_importance' not in losses:
        return Outcome('CRASH', 'no loss_moe_importance in the loss dict')
    if _non_finite(losses):
        return Outcome('CRASH', f'non-finite {_non_finite(losses)}')
    preds = [r.pred_instances for r in results]
    if not any(len(p) for p in preds):
        return Outcome('CRASH', 'no detections at score_thr 0')
    try:  # the test loop's statistics, from these detections' tags
        stats, _ = statistics(model, FAMILIES[family][1])
    except Exception as err:  # noqa: BLE001
        return Outcome('CRASH', 'statistics: ' + _first_line(err) + ' @ ' + _where(err))
    untagged = [name for name, layer in stats['layers'].items()
                if layer['detection_gates'] != 'tagged']
    if all('expert_weights' in p for p in preds) and not untagged:
        # a zero row: the layer did not feed that detection (e.g. a module of a level
        # the head does not decode)
        if any(p.expert_weights.flatten(1).any(1).any() for p in preds):
            return Outcome('tagged')
        return Outcome('per-image', 'its MoE layers feed none of the detections (their '
                       'tags are rows of zeros)')
    return Outcome('per-image', _untagged_reason(model))


def _where(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    last = frames[-1] if frames else None
    return f'{osp.basename(last.filename)}:{last.lineno}' if last else '?'


def _untagged_reason(model: nn.Module) -> str:
    from mmdet_moe.models import untagged_layers_reason
    return untagged_layers_reason(model) or 'untagged (no reason given)'


def census(families: List[str], log=print) -> List[FamilyResult]:
    """Run every insertion form on each family; ``log`` gets one line per family."""
    results = []
    for family in families:
        if family not in FAMILIES:
            raise SystemExit(f'unknown family {family!r}; choose from {sorted(FAMILIES)}')
        start = time.time()
        result = FamilyResult(family, FAMILIES[family][0])
        try:  # the stock model itself must run here (some ops lack a CPU kernel)
            stock = stock_model_cfg(family)
            dense = build_detector(family, stock)
            losses, predictions = train_and_predict(dense, FAMILIES[family][1])
            result.stock = 'ok' if not _non_finite(losses) else \
                f'non-finite {_non_finite(losses)}'
            if not any(len(p.pred_instances) for p in predictions):
                result.stock = 'no detections at score_thr 0'
        except Exception as err:  # noqa: BLE001
            result.stock = _first_line(err) + ' @ ' + _where(err)
        with quiet():
            for form in FORMS if result.stock == 'ok' else ():
                result.forms[form] = run_form(family, stock, form, dense)
        result.seconds = time.time() - start
        log(f'{family:18s} ' + (f'stock model fails: {result.stock}' if result.stock != 'ok'
                                else ' | '.join(f'{f}: {o.cell()}' for f, o in
                                                result.forms.items()))
            + f'  ({result.seconds:.0f} s)')
        results.append(result)
    return results


def table(results: List[FamilyResult]) -> str:
    """The markdown table (one status per form) and, below it, each family's reasons."""
    rows = ['| family | config | neck `conv_cfg` | head conv path | subnet | tagged |',
            '|---|---|---|---|---|---|']
    notes = []
    for r in results:
        if r.stock != 'ok':
            cells = ['untested'] * len(FORMS)
            notes.append(f'- **{r.family}**: untested, the stock model itself fails here: '
                         f'{r.stock}')
        else:
            cells = [o.status for o in r.forms.values()]
            by_text: Dict[str, List[str]] = {}  # one note per distinct reason
            for form, outcome in r.forms.items():
                if outcome.detail:
                    by_text.setdefault(f'{outcome.status}: {outcome.detail}', []).append(form)
            notes += [f'- **{r.family}** ({", ".join(forms)}): {text}'
                      for text, forms in by_text.items()]
        rows.append(f'| {r.family} | `{osp.basename(r.config)}` | ' + ' | '.join(cells) +
                    f' | {"yes" if r.tagged else "no"} |')
    tested = [r for r in results if r.stock == 'ok']
    tagged = sum(r.tagged for r in results)
    crashed = sum(r.crashed for r in results)
    summary = (f'{tagged} of {len(results)} families ({len(tested)} run here) tagged by at '
               f'least one form; {crashed} with a crash after the build.')
    return '\n'.join(rows + ['', summary, '', 'Why a form is not tagged, refused or '
                              'untested:', ''] + [n.replace('|', '\\|') for n in notes])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--families', nargs='+', default=list(FAMILIES))
    parser.add_argument('--out', help='write the markdown table between the markers of '
                        'this page')
    args = parser.parse_args(argv)
    results = census(args.families)
    text = table(results)
    print(text)
    if args.out:
        write_table(args.out, text)
    return 1 if any(r.crashed for r in results) else 0


BEGIN, END = '<!-- census:begin -->', '<!-- census:end -->'


def write_table(path: str, text: str) -> None:
    page = open(path).read()
    if BEGIN not in page or END not in page:
        raise SystemExit(f'{path} lacks the markers {BEGIN} … {END}')
    head, rest = page.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(path, 'w') as f:
        f.write(f'{head}{BEGIN}\n{text}\n{END}{tail}')


if __name__ == '__main__':
    sys.exit(main())
