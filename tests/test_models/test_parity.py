"""Parity with stock mmdet: a MoE detector upcycled from a dense one (identical
experts, gate noise off) gives the dense detector's loss values and predictions.

The independent computation is the stock mmdet detector itself. Every MoE component
and insertion target is covered: MoERetinaHead (each branch variant), MoEFPN, MoE
convs from ``conv_cfg``, and ``MoEDetector`` paths into FCOS, ATSS, GFL, TOOD and the
RPN and RoI-head convs of Faster R-CNN and Cascade R-CNN (every stage); predictions
under several ``test_cfg`` variants, ``rescale`` on and off, ``with_nms=False``,
batches of 1 and 3 images of different shapes. Parameters are re-drawn at a realistic scale so that scores spread
over (0, 1) and the comparison is not vacuous (no detection passes ``score_thr`` at
mmdet's initialisation).
"""
import copy

import pytest
import torch
from mmengine.config import ConfigDict

from helpers import (assert_losses_equal_dense, build_model, redraw_parameters,
                     stock_model_cfg)

WIDTH = 64  # FPN and head channels (GN with 32 groups needs 2+ channels per group on 1×1 maps)
NOISELESS = dict(type='TopKGate', noisy=False)
MOE = dict(num_experts=3, top_k=2, gate_cfg=NOISELESS, balance_cfg=dict(importance=0.5))


def moe_detector(model, *paths):
    return ConfigDict(type='MoEDetector', detector=model,
                      moe_layers=[dict(paths=list(paths), **MOE)])


def retina_head(branches, expert_type):
    def make(model):
        model.bbox_head.update(type='MoERetinaHead', moe_branches=branches,
                               expert_type=expert_type, moe_convs=(1, 3), **MOE)
        return model
    return make


def moe_fpn(model):
    model.neck.update(type='MoEFPN', moe_parts=('lateral', 'output', 'extra'), **MOE)
    return model


def conv_cfg_in(*parts):
    def make(model):
        for part in parts:
            model[part].conv_cfg = dict(type='MoEConv2d', **MOE)
        return model
    return make


RETINANET = 'retinanet/retinanet_r50_fpn_1x_coco.py'
FASTER_RCNN = 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
CASCADE_RCNN = 'cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py'
TARGETS = {
    'retina-head-cls-subnet': (RETINANET, retina_head('cls', 'subnet')),
    'retina-head-reg-subnet': (RETINANET, retina_head('reg', 'subnet')),
    'retina-head-both-subnet': (RETINANET, retina_head('both', 'subnet')),
    'retina-head-shared-subnet': (RETINANET, retina_head('shared', 'subnet')),
    'retina-head-both-conv': (RETINANET, retina_head('both', 'conv')),
    'retina-moe-fpn': (RETINANET, moe_fpn),
    'retina-conv_cfg-fpn-head': (RETINANET, conv_cfg_in('neck', 'bbox_head')),
    'fcos-paths': ('fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py', lambda m: moe_detector(
        m, 'bbox_head.cls_convs.*.conv', 'bbox_head.reg_convs.3.conv')),
    'atss-paths': ('atss/atss_r50_fpn_1x_coco.py', lambda m: moe_detector(
        m, 'bbox_head.cls_convs.*.conv', 'bbox_head.reg_convs.0.conv')),
    'gfl-paths': ('gfl/gfl_r50_fpn_1x_coco.py', lambda m: moe_detector(
        m, 'bbox_head.cls_convs.3.conv', 'bbox_head.reg_convs.*.conv')),
    'tood-paths': ('tood/tood_r50_fpn_1x_coco.py', lambda m: moe_detector(
        m, 'bbox_head.inter_convs.*.conv')),
    'faster-rcnn-rpn-paths': (FASTER_RCNN, lambda m: moe_detector(m, 'rpn_head.rpn_conv')),
    'faster-rcnn-roi-paths': (FASTER_RCNN, lambda m: moe_detector(
        m, 'roi_head.bbox_head.shared_convs.*.conv')),
    'faster-rcnn-conv_cfg-rpn-roi': (FASTER_RCNN, lambda m: conv_cfg_in('neck')(m) or (
        m.roi_head.bbox_head.update(conv_cfg=dict(type='MoEConv2d', **MOE)) or m)),
    'cascade-rcnn-rpn-stages-paths': (CASCADE_RCNN, lambda m: moe_detector(
        m, 'rpn_head.rpn_conv', 'roi_head.bbox_head.*.shared_convs.0.conv')),
}

# test_cfg variants: (changes to the head's test_cfg, rescale)
VARIANTS = {
    'default': ({}, True),
    'min_bbox_size-8': (dict(min_bbox_size=8), True),
    # 32 px removes a third of the dense detections of most targets here
    'min_bbox_size-32': (dict(min_bbox_size=32), True),
    'min_bbox_size-32-no-rescale': (dict(min_bbox_size=32), False),
    'small-nms_pre': (dict(nms_pre=20), True),
}
SHAPES = {1: [(3, 96, 80)], 3: [(3, 96, 80), (3, 64, 96), (3, 80, 72)]}
# images downscaled (rescaling enlarges boxes across min_bbox_size) and upscaled
SCALE_FACTORS = [(0.5, 0.4), (1.25, 1.5), (0.8, 0.8)]


@pytest.fixture(scope='module', params=sorted(TARGETS))
def pair(request):
    """(dense model, MoE model upcycled from it), both in eval mode."""
    path, make_moe = TARGETS[request.param]
    dense_cfg = stock_model_cfg(path, WIDTH)
    dense = build_model(copy.deepcopy(dense_cfg))
    redraw_parameters(dense)
    moe = build_model(make_moe(copy.deepcopy(dense_cfg)))
    missing, unexpected = moe.load_state_dict(dense.state_dict(), strict=False)
    assert unexpected == [] and missing and all('.gate.' in k for k in missing), missing
    assert any(getattr(m, 'is_moe_module', False) for m in moe.modules())
    return request.param, dense.eval(), moe.eval()


def batch(model, size, seed=0, train=False):
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(seed)
    packed = demo_mm_inputs(size, SHAPES[size], num_items=[4] * size, num_classes=5)
    for sample, scale in zip(packed['data_samples'], SCALE_FACTORS, strict=False):
        sample.set_metainfo(dict(scale_factor=scale))
    return model.data_preprocessor(packed, train)


def heads_test_cfgs(model):
    """The test_cfg objects a detector's predict reads for proposals / detections."""
    heads = [getattr(model, name) for name in ('bbox_head', 'rpn_head') if hasattr(model, name)]
    return [head.test_cfg for head in heads]


# float32 rounding of the head's outputs grows into a box as stride × rescale ×
# regression: an absolute tolerance alone fails large boxes on some CPUs' conv kernels
BOX_REL_TOL = 1e-4


def detection_distance(a, b, tol):
    """(len(a), len(b)) distances in tolerances: box L∞ over tol + BOX_REL_TOL·|box|,
    100 × |score difference| over tol, and any label mismatch far beyond 1."""
    box = ((a.bboxes[:, None] - b.bboxes[None]).abs() /
           (tol + BOX_REL_TOL * b.bboxes[None].abs())).amax(-1)
    return (box + 100 * (a.scores[:, None] - b.scores[None]).abs() / tol +
            1e3 * (a.labels[:, None] != b.labels[None]))


def assert_same_predictions(got, want, tol=5e-3):
    """The same detections (boxes, scores, labels) within float tolerance. Order is
    free where scores are near-tied (float rounding may swap them): detections that
    differ at their position must each have a match among the other side's."""
    assert len(got) == len(want)
    got, want = ([r.pred_instances if hasattr(r, 'pred_instances') else r for r in results]
                 for results in (got, want))
    assert sum(map(len, want)) > 0
    assert not any('levels' in w for w in want)  # the dense model's own results
    for g, w in zip(got, want, strict=True):
        assert len(g) == len(w)
        if not len(w):
            continue
        moved = detection_distance(g, w, tol).diagonal() >= 1
        if moved.any():
            distance = detection_distance(g[moved], w[moved], tol)
            assert distance.min(dim=1).values.max() < 1
            assert distance.min(dim=0).values.max() < 1


@pytest.mark.slow
@pytest.mark.parametrize('batch_size', [1, 3])
@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_predict_equals_dense(pair, variant, batch_size):
    _, dense, moe = pair
    changes, rescale = VARIANTS[variant]
    data = batch(dense, batch_size)
    results = []
    for model in (dense, moe):
        saved = [copy.deepcopy(cfg) for cfg in heads_test_cfgs(model)]
        for cfg in heads_test_cfgs(model):
            cfg.update(changes)
        try:
            with torch.no_grad():
                # predict writes into the samples it is given: each model its own
                results.append(model.predict(data['inputs'],
                                             copy.deepcopy(data['data_samples']),
                                             rescale=rescale))
        finally:
            for cfg, old in zip(heads_test_cfgs(model), saved, strict=True):
                cfg.clear()
                cfg.update(old)
    assert_same_predictions(*reversed(results))


@pytest.mark.slow
@pytest.mark.parametrize('batch_size', [1, 3])
def test_predict_by_feat_without_nms_equals_dense(pair, batch_size):
    name, dense, moe = pair
    if not hasattr(dense, 'bbox_head'):
        pytest.skip('RPNHead always applies NMS (mmdet asserts with_nms=True)')
    data = batch(dense, batch_size)
    metas = [s.metainfo for s in data['data_samples']]
    results = []
    for model in (dense, moe):
        with torch.no_grad():
            outs = model.bbox_head(model.extract_feat(data['inputs']))
            results.append(model.bbox_head.predict_by_feat(
                *outs, batch_img_metas=metas, rescale=True, with_nms=False))
    assert_same_predictions(*reversed(results))


def test_loss_equals_dense(pair):
    name, dense, moe = pair
    # the same random samples in both (e.g. the RoI sampler)
    assert_losses_equal_dense(dense, moe, lambda m: batch(m, 3, train=True), name, seed=1)
