"""mmdet 3.3.0's own unit-test cases, replayed on MoERetinaHead, MoEFPN and MoERetinaNet.

Each test names the mmdet test (and case) it mirrors. The sources (mmdet v3.3.0):
  tests/test_models/test_dense_heads/test_anchor_head.py        (AnchorHead, RetinaHead's base)
  tests/test_models/test_dense_heads/test_retina_sepBN_head.py  (the RetinaHead-family test)
  tests/test_models/test_necks/test_necks.py::test_fpn
  tests/test_models/test_detectors/test_single_stage.py         (RetinaNet-R18 config)
mmdet has no test file of its own for RetinaHead; where it only documents an API
(``RetinaHead.forward_single``'s docstring example, ``BaseDenseHead.predict`` /
``loss_and_predict``) the test says so.

Beyond mmdet's checks, every case also checks parity where it is cheap: a MoE module
upcycled from the dense mmdet module (``load_state_dict(dense.state_dict(),
strict=False)``, only gate keys missing) must compute what the dense module computes.
"""
import copy
import time

import pytest
import torch
from mmengine.config import ConfigDict
from mmengine.logging import MessageHub
from mmengine.registry import init_default_scope
from mmengine.structures import InstanceData
from torch.nn.modules.batchnorm import _BatchNorm

import mmdet_moe  # noqa: F401  (registers the MoE modules)
from helpers import TOY_BASE_CONFIG, build_model, load_config
from mmdet.models.dense_heads import RetinaHead
from mmdet.models.detectors import RetinaNet
from mmdet.models.necks import FPN
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.testing import demo_mm_inputs
from mmdet_moe.layers import MoE, MoEConv2d, is_moe_module
from mmdet_moe.models.dense_heads import MoERetinaHead
from mmdet_moe.models.detectors import MoERetinaNet
from mmdet_moe.models.necks import MoEFPN

init_default_scope('mmdet')


@pytest.fixture(autouse=True, scope='module')
def _one_torch_thread():
    """These tensors are tiny: one intra-op thread is as fast, and it keeps the file
    fast when other processes share the 2 cores (OpenMP threads then wait on each
    other: ~20 ms instead of ~0.3 ms per small conv)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ATOL, RTOL = 1e-5, 1e-4


def assert_close(got, want, what=''):
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f'{what}: {m}')


def assert_nested_close(got, want, what=''):
    """Lists/tuples of tensors (e.g. (cls_scores, bbox_preds)) element by element."""
    if isinstance(want, torch.Tensor):
        assert_close(got, want, what)
        return
    assert len(got) == len(want), f'{what}: {len(got)} items, dense gives {len(want)}'
    for i, (g, w) in enumerate(zip(got, want)):
        assert_nested_close(g, w, f'{what}[{i}]')


def upcycle(moe, dense):
    """Load the dense module's weights into the MoE one; only gate keys may be missing."""
    missing, unexpected = moe.load_state_dict(dense.state_dict(), strict=False)
    assert unexpected == [], unexpected
    assert missing and all('.gate.' in k or k.startswith('gate.') for k in missing), missing
    return moe


def assert_same_detections(got, want, what=''):
    assert len(got) == len(want), f'{what}: {len(got)} detections, dense gives {len(want)}'
    assert len(want) > 0, f'{what}: no detections to compare'
    assert_close(got.bboxes, want.bboxes, f'{what} bboxes')
    assert_close(got.scores, want.scores, f'{what} scores')
    assert torch.equal(got.labels, want.labels), f'{what}: labels differ'


# --------------------------------------------------------------------------------------
# RetinaHead / AnchorHead cases
# --------------------------------------------------------------------------------------
S = 256  # image side of mmdet's anchor-head tests (the one-GT box needs it)
NUM_CLASSES = 4
HEAD_CHANNELS = 8
NUM_LEVELS = 5

# train_cfg / losses of the two mmdet tests: RetinaNet's (test_retina_sepBN_head.py:
# MaxIoU 0.5/0.4 + PseudoSampler, focal loss) and AnchorHead's (test_anchor_head.py:
# MaxIoU 0.7/0.3 + RandomSampler, the AnchorHead default CE/SmoothL1 losses).
HEAD_SETUPS = {
    'retina_sepbn_cfg': dict(
        train_cfg=dict(
            assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.4,
                          min_pos_iou=0, ignore_iof_thr=-1),
            sampler=dict(type='PseudoSampler'), allowed_border=-1, pos_weight=-1,
            debug=False),
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
                      loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    'anchor_head_cfg': dict(
        train_cfg=dict(
            assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.7, neg_iou_thr=0.3,
                          min_pos_iou=0.3, match_low_quality=True, ignore_iof_thr=-1),
            sampler=dict(type='RandomSampler', num=256, pos_fraction=0.5, neg_pos_ub=-1,
                         add_gt_as_proposals=False),
            allowed_border=0, pos_weight=-1, debug=False)),
}
HEAD_TEST_CFG = dict(nms_pre=100, min_bbox_size=0, score_thr=0.0,
                     nms=dict(type='nms', iou_threshold=0.5), max_per_img=30)

# MoERetinaHead variants: every moe_branches, both expert types, and a spread of
# num_experts / top_k / gate_cfg / balance_cfg.
HEAD_VARIANTS = {
    'cls-subnet': dict(moe_branches='cls', expert_type='subnet'),
    'reg-subnet-N3-top1': dict(moe_branches='reg', expert_type='subnet', num_experts=3,
                               top_k=1),
    'both-subnet-balanced': dict(moe_branches='both', expert_type='subnet',
                                 balance_cfg=dict(importance=0.5, kl_uniform=0.1)),
    'shared-subnet-hard': dict(moe_branches='shared', expert_type='subnet',
                               gate_cfg=dict(type='RelativeImportanceGate', threshold=0.3)),
    'cls-conv': dict(moe_branches='cls', expert_type='conv', moe_convs=(1,)),
    'both-conv-convgate': dict(moe_branches='both', expert_type='conv', moe_convs=(0, 1),
                               gate_cfg=dict(type='TopKGate', gate_type='conv',
                                             conv_channels=8),
                               balance_cfg=dict(importance=0.5)),
}


def head_cfg(moe=None, setup='retina_sepbn_cfg'):
    cfg = dict(type='RetinaHead', num_classes=NUM_CLASSES, in_channels=HEAD_CHANNELS,
               feat_channels=HEAD_CHANNELS, stacked_convs=2,
               test_cfg=HEAD_TEST_CFG, **HEAD_SETUPS[setup])
    if moe is not None:
        cfg.update(type='MoERetinaHead', **moe)
    return ConfigDict(cfg)


def dense_and_moe_heads(variant, setup='retina_sepbn_cfg'):
    """A dense RetinaHead (torch's default init, so outputs are not ~0) and the MoE
    head upcycled from it."""
    dense = MODELS.build(head_cfg(None, setup))
    moe = upcycle(MODELS.build(head_cfg(HEAD_VARIANTS[variant], setup)), dense)
    assert type(dense) is RetinaHead and isinstance(moe, MoERetinaHead)
    return dense, moe


def head_feats(batch=1, seed=0):
    """Features as mmdet's anchor-head tests shape them: level i is S / 2**(i+2) wide.
    Levels differ in scale so that (image, level) routing differs between levels."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, HEAD_CHANNELS, S // 2 ** (i + 2), S // 2 ** (i + 2),
                        generator=g) * (1 + i) + i for i in range(NUM_LEVELS)]


def img_metas(batch=1, scale_factor=(1.0, 1.0)):
    return [dict(img_shape=(S, S), pad_shape=(S, S), ori_shape=(S, S),
                 scale_factor=scale_factor) for _ in range(batch)]


def empty_gt():
    gt = InstanceData()
    gt.bboxes = torch.empty((0, 4))
    gt.labels = torch.LongTensor([])
    return gt


def one_gt():
    gt = InstanceData()
    gt.bboxes = torch.Tensor([[23.6667, 23.8757, 238.6326, 151.8874]])
    gt.labels = torch.LongTensor([2])
    return gt


def data_samples(batch=2, scale_factor=(2.0, 1.5), with_gt=False):
    samples = []
    for b in range(batch):
        sample = DetDataSample()
        h, w = S / scale_factor[1], S / scale_factor[0]
        sample.set_metainfo(dict(img_shape=(S, S), pad_shape=(S, S), ori_shape=(h, w),
                                 scale_factor=scale_factor))
        if with_gt:
            sample.gt_instances = one_gt() if b == 0 else empty_gt()
        samples.append(sample)
    return samples


def summed(losses, key):
    value = losses[key]
    return sum(value) if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize('variant', HEAD_VARIANTS)
def test_head_init(variant):
    """Mirrors mmdet test_retina_sepBN_head.py::test_init (towers and output convs
    exist after init_weights): for MoE they live in the experts; init_weights puts
    the focal-loss prior on every classification output conv, dense or expert."""
    moe_args = HEAD_VARIANTS[variant]
    head = MODELS.build(head_cfg(moe_args))
    head.init_weights()
    names = [n for n, _ in head.named_modules()]
    for part in ('cls_convs', 'reg_convs', 'retina_cls', 'retina_reg'):
        assert any(n.split('.')[-1] == part for n in names), f'no {part} in the head'
    moes = [m for m in head.modules() if is_moe_module(m)]
    num_moe = {('subnet', 'cls'): 1, ('subnet', 'reg'): 1, ('subnet', 'both'): 2,
               ('subnet', 'shared'): 2}.get((moe_args['expert_type'], moe_args['moe_branches']))
    if num_moe is None:  # conv experts: one MoEConv2d per listed conv per branch
        branches = 2 if moe_args['moe_branches'] == 'both' else 1
        num_moe = branches * len(moe_args['moe_convs'])
        assert all(isinstance(m, MoEConv2d) for m in moes)
    else:
        assert all(isinstance(m, MoE) for m in moes)
    assert len(moes) == num_moe
    prior = -torch.log(torch.tensor((1 - 0.01) / 0.01))
    cls_outs = [m for n, m in head.named_modules() if n.endswith('retina_cls')]
    assert cls_outs
    for conv in cls_outs:
        torch.testing.assert_close(conv.bias.detach(), torch.full_like(conv.bias, prior))


@pytest.mark.parametrize('setup', HEAD_SETUPS)
@pytest.mark.parametrize('variant', HEAD_VARIANTS)
def test_head_loss_empty_and_one_gt(variant, setup):
    """Mirrors mmdet test_anchor_head.py::test_anchor_head_loss ('anchor_head_cfg') and
    test_retina_sepBN_head.py::test_retina_sepbn_head_loss ('retina_sepbn_cfg'):
    empty GT → cls loss > 0, box loss == 0; one GT → both > 0. Parity: the upcycled
    MoE head's losses equal the dense RetinaHead's."""
    dense, moe = dense_and_moe_heads(variant, setup)
    feats = tuple(head_feats())
    dense_outs, moe_outs = dense.forward(feats), moe.forward(feats)
    assert_nested_close(moe_outs, dense_outs, 'forward')
    for name, gt in (('empty', empty_gt()), ('one', one_gt())):
        torch.manual_seed(7)  # RandomSampler draws the same anchors for both heads
        want = dense.loss_by_feat(*dense_outs, [gt], img_metas())
        torch.manual_seed(7)
        got = moe.loss_by_feat(*moe_outs, [gt], img_metas())
        cls_loss, box_loss = summed(got, 'loss_cls'), summed(got, 'loss_bbox')
        assert cls_loss.item() > 0, 'cls loss should be non-zero'
        if name == 'empty':
            assert box_loss.item() == 0, 'no box loss without true boxes'
        else:
            assert box_loss.item() > 0, 'box loss should be non-zero'
        assert_close(cls_loss, summed(want, 'loss_cls'), f'{name} GT loss_cls')
        assert_close(box_loss, summed(want, 'loss_bbox'), f'{name} GT loss_bbox')
        moe_keys = {k for k in got if k.startswith('loss_moe_')}
        if name == 'empty' and HEAD_VARIANTS[variant].get('balance_cfg'):
            assert moe_keys == {f'loss_moe_{k}' for k in HEAD_VARIANTS[variant]['balance_cfg']}
            assert all(torch.isfinite(got[k]) and got[k] >= 0 for k in moe_keys)
        else:
            assert set(got) - moe_keys == set(want)


@pytest.mark.parametrize('variant', HEAD_VARIANTS)
def test_head_forward_single_pass_iterable(variant):
    """Mirrors mmdet test_anchor_head.py::test_anchor_head_loss as written: the
    features are a *generator* (``feats = (torch.rand(...) for i in ...)``) passed
    to ``forward``, then empty/one-GT losses. Known defect (a): MoERetinaHead reads
    the input more than once."""
    dense, moe = dense_and_moe_heads(variant)
    levels = head_feats()
    dense_outs = dense.forward(f for f in levels)
    moe_outs = moe.forward(f for f in levels)
    assert len(moe_outs) == 2
    for name, outs in zip(('cls_scores', 'bbox_preds'), moe_outs):
        assert len(outs) == NUM_LEVELS, f'{name}: {len(outs)} levels from a generator'
    assert_nested_close(moe_outs, dense_outs, 'forward(generator)')
    assert_nested_close(moe_outs, moe.forward(tuple(levels)), 'generator vs tuple')
    empty = moe.loss_by_feat(*moe_outs, [empty_gt()], img_metas())
    assert summed(empty, 'loss_cls') > 0 and summed(empty, 'loss_bbox') == 0
    one = moe.loss_by_feat(*moe_outs, [one_gt()], img_metas())
    assert summed(one, 'loss_cls') > 0 and summed(one, 'loss_bbox') > 0


@pytest.mark.parametrize('variant', HEAD_VARIANTS)
def test_head_forward_single(variant):
    """Mirrors RetinaHead's API as mmdet documents and uses it (the docstring example
    of mmdet/models/dense_heads/retina_head.py; AnchorHead.forward =
    multi_apply(forward_single, feats)): one level in, (cls_score, bbox_pred) out with
    num_base_priors * num_classes and num_base_priors * 4 channels. Parity: equals
    the dense head's forward_single when upcycled, and the MoE head's own forward()
    per level (routing is per (image, level)). Known defect (b) for subnet experts."""
    dense, moe = dense_and_moe_heads(variant)
    dense.eval(), moe.eval()
    levels = head_feats(batch=2)
    with torch.no_grad():
        cls_score, bbox_pred = moe.forward_single(levels[1])
        assert cls_score.shape[1] == moe.num_base_priors * NUM_CLASSES
        assert bbox_pred.shape[1] == moe.num_base_priors * 4
        assert_nested_close((cls_score, bbox_pred), dense.forward_single(levels[1]),
                            'forward_single vs dense')
        fresh = MODELS.build(head_cfg(HEAD_VARIANTS[variant])).eval()  # not upcycled
        per_level = fresh.forward(tuple(levels))
        for level, x in enumerate(levels):
            assert_nested_close(fresh.forward_single(x),
                                (per_level[0][level], per_level[1][level]),
                                f'forward_single vs forward, level {level}')


@pytest.mark.parametrize('variant', HEAD_VARIANTS)
def test_head_predict_rescale(variant):
    """Mirrors BaseDenseHead.predict(x, data_samples, rescale) as mmdet's single-stage
    detectors call it, and the predict_by_feat(rescale=True/False) cases of mmdet's
    dense-head tests (e.g. test_yolox_head.py::test_predict_by_feat): rescale=False
    gives boxes in the network input frame, rescale=True divides them by
    scale_factor. Parity: the upcycled MoE head gives the dense head's detections."""
    dense, moe = dense_and_moe_heads(variant)
    dense.eval(), moe.eval()
    feats = tuple(head_feats(batch=2))
    sf = (2.0, 1.5)
    samples = data_samples(batch=2, scale_factor=sf)
    with torch.no_grad():
        results = {r: moe.predict(feats, samples, rescale=r) for r in (False, True)}
        wanted = {r: dense.predict(feats, samples, rescale=r) for r in (False, True)}
    scale = torch.tensor([sf[0], sf[1], sf[0], sf[1]])
    for b in range(2):
        plain, rescaled = results[False][b], results[True][b]
        for r in (False, True):
            assert_same_detections(results[r][b], wanted[r][b], f'image {b} rescale={r}')
        assert_close(rescaled.bboxes, plain.bboxes / scale, f'image {b} rescaled boxes')
        assert_close(rescaled.scores, plain.scores, f'image {b} scores')
        # MoE extras: FPN level and the gate weights behind each detection
        num_experts = HEAD_VARIANTS[variant].get('num_experts', 4)
        for pred in (plain, rescaled):
            assert pred.levels.shape == (len(pred),)
            assert int(pred.levels.max()) < NUM_LEVELS
            assert pred.expert_weights.shape[0] == len(pred)
            assert pred.expert_weights.shape[-1] == num_experts
            torch.testing.assert_close(pred.expert_weights.sum(-1),
                                       torch.ones(pred.expert_weights.shape[:-1]))


@pytest.mark.parametrize('variant', HEAD_VARIANTS)
def test_head_loss_and_predict(variant):
    """Mirrors BaseDenseHead.loss_and_predict (forward → loss_by_feat →
    predict_by_feat, as two-stage detectors call an RPN-style head; mmdet 3.3.0 has
    no direct unit test for it): training mode, one image with one GT and one with
    none. Parity: losses and predictions equal the dense head's."""
    dense, moe = dense_and_moe_heads(variant)
    dense.train(), moe.train()
    feats = tuple(head_feats(batch=2))
    samples = data_samples(batch=2, with_gt=True)
    want_losses, want_preds = dense.loss_and_predict(feats, samples)
    losses, preds = moe.loss_and_predict(feats, samples)
    for key in ('loss_cls', 'loss_bbox'):
        assert summed(losses, key) > 0
        assert_close(summed(losses, key), summed(want_losses, key), key)
    balance = HEAD_VARIANTS[variant].get('balance_cfg') or {}
    assert {k for k in losses if k.startswith('loss_moe_')} == \
        {f'loss_moe_{k}' for k in balance}
    assert len(preds) == 2
    for b in range(2):
        assert_same_detections(preds[b], want_preds[b], f'image {b}')
    # the losses reach the experts (and, with balance losses, the gates)
    total = sum(summed(losses, k) for k in losses if k.startswith('loss'))
    total.backward()
    for module in (m for m in moe.modules() if is_moe_module(m)):
        grads = [p.grad for n, p in module.named_parameters() if not n.startswith('gate.')]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
        if balance:
            gate_grad = module.gate.w_gate.weight.grad
            assert gate_grad is not None and gate_grad.abs().sum() > 0


# --------------------------------------------------------------------------------------
# FPN cases (mmdet tests/test_models/test_necks/test_necks.py::test_fpn)
# --------------------------------------------------------------------------------------
FPN_S = 64
FPN_IN = [8, 16, 32, 64]
FPN_OUT = 8
FPN_BASE = dict(in_channels=FPN_IN, out_channels=FPN_OUT)


def fpn_feats(batch=2):
    g = torch.Generator().manual_seed(3)
    return [torch.rand(batch, c, FPN_S // 2 ** i, FPN_S // 2 ** i, generator=g) * (1 + i)
            for i, c in enumerate(FPN_IN)]


# id: (FPN kwargs, moe_parts, the case of test_fpn it mirrors)
FPN_CASES = {
    'extra_convs_true': (dict(start_level=1, add_extra_convs=True, num_outs=5),
                         ('lateral', 'output', 'extra'),
                         "add_extra_convs=True (== 'on_input')"),
    'no_extra_convs': (dict(start_level=1, add_extra_convs=False, num_outs=5),
                       ('lateral', 'output'),
                       'add_extra_convs=False (max-pool extra levels)'),
    'lateral_bn': (dict(start_level=1, add_extra_convs=True, no_norm_on_lateral=False,
                        norm_cfg=dict(type='BN', requires_grad=True), num_outs=5),
                   ('lateral', 'output', 'extra'),
                   'lateral BNs (no_norm_on_lateral=False, norm_cfg=BN)'),
    'bilinear_upsample': (dict(start_level=1, add_extra_convs=True, num_outs=5,
                               upsample_cfg=dict(mode='bilinear', align_corners=True)),
                          ('output',), "upsample_cfg mode='bilinear'"),
    'scale_factor_upsample': (dict(start_level=1, add_extra_convs=True, num_outs=5,
                                   upsample_cfg=dict(scale_factor=2)),
                              ('lateral', 'output'), 'upsample_cfg scale_factor=2'),
    'on_input': (dict(start_level=1, add_extra_convs='on_input', num_outs=5),
                 ('extra',), "add_extra_convs='on_input'"),
    'on_lateral': (dict(start_level=1, add_extra_convs='on_lateral', num_outs=5),
                   ('lateral', 'extra'), "add_extra_convs='on_lateral'"),
    'on_output': (dict(start_level=1, add_extra_convs='on_output', num_outs=5),
                  ('output', 'extra'), "add_extra_convs='on_output'"),
    # beyond test_fpn's own list, FPN options the brief asks for
    'relu_before_extra_convs': (dict(start_level=1, add_extra_convs='on_output',
                                     relu_before_extra_convs=True, num_outs=5),
                                ('output', 'extra'), 'relu_before_extra_convs=True'),
    'start0_num_outs6_on_output': (dict(start_level=0, add_extra_convs='on_output',
                                        num_outs=6),
                                   ('lateral', 'output', 'extra'),
                                   'start_level=0, num_outs (6) > input levels (4)'),
    'start0_num_outs6_pool': (dict(start_level=0, add_extra_convs=False, num_outs=6),
                              ('output',), 'num_outs > levels with max-pool extras'),
    'end_level2': (dict(start_level=1, end_level=2, num_outs=2),
                   ('lateral', 'output'), 'end_level=2 (not the last level)'),
}


@pytest.mark.parametrize('case', FPN_CASES)
def test_fpn_options(case):
    """Mirrors mmdet test_necks.py::test_fpn, one case per FPN configuration it builds
    (see FPN_CASES), with the shapes test_fpn means to check asserted; parity: the
    upcycled MoEFPN equals the dense FPN in eval mode."""
    kwargs, parts, _ = FPN_CASES[case]
    dense = FPN(**FPN_BASE, **kwargs)
    moe = MODELS.build(dict(type='MoEFPN', moe_parts=list(parts), num_experts=3, top_k=2,
                            **FPN_BASE, **kwargs))
    assert isinstance(moe, MoEFPN)
    upcycle(moe, dense)
    if kwargs.get('add_extra_convs') is True:
        assert moe.add_extra_convs == 'on_input'
    elif kwargs.get('add_extra_convs') is False:
        assert not moe.add_extra_convs
    if 'norm_cfg' in kwargs:
        assert any(isinstance(m, _BatchNorm) for m in moe.modules())
        assert all(c.norm_name for c in moe.lateral_convs)
    num_used = moe.backbone_end_level - moe.start_level
    expected = {'lateral': num_used, 'output': num_used,
                'extra': len(moe.fpn_convs) - num_used}
    moe_convs = [m for m in moe.modules() if isinstance(m, MoEConv2d)]
    assert len(moe_convs) == sum(expected[p] for p in parts)
    feats = fpn_feats()
    dense.eval(), moe.eval()
    with torch.no_grad():
        assert_nested_close(moe(feats), dense(feats), f'MoEFPN vs FPN ({case})')
    moe.train()
    outs = moe(feats)  # training mode (noisy gates, batch-stat BN), as test_fpn runs it
    assert len(outs) == moe.num_outs == kwargs['num_outs']
    first = FPN_S // 2 ** kwargs['start_level']
    for i, out in enumerate(outs):
        assert out.shape == (2, FPN_OUT, first // 2 ** i, first // 2 ** i), (i, out.shape)


def test_fpn_end_level_minus_one_equals_last_level():
    """Mirrors mmdet test_necks.py::test_fpn, 'end_level=-1 is equal to end_level=3':
    the two MoEFPNs have the same modules (strict state-dict load) and outputs."""
    a = MODELS.build(dict(type='MoEFPN', start_level=0, end_level=-1, num_outs=5,
                          moe_parts=['lateral', 'output'], **FPN_BASE)).eval()
    b = MODELS.build(dict(type='MoEFPN', start_level=0, end_level=3, num_outs=5,
                          moe_parts=['lateral', 'output'], **FPN_BASE)).eval()
    assert a.backbone_end_level == b.backbone_end_level == len(FPN_IN)
    b.load_state_dict(a.state_dict())
    feats = fpn_feats()
    with torch.no_grad():
        assert_nested_close(a(feats), b(feats), 'end_level -1 vs 3')


@pytest.mark.parametrize('kwargs, case', [
    (dict(start_level=1, end_level=2, num_outs=3), 'num_outs != end_level - start_level + 1'),
    (dict(start_level=1, num_outs=2), 'num_outs < len(in_channels) - start_level'),
    (dict(start_level=1, end_level=4, num_outs=2), 'invalid end_level (> last level)'),
    (dict(start_level=1, end_level=3, num_outs=1), 'num_outs != end_level - start_level'),
    (dict(start_level=1, add_extra_convs='on_xxx', num_outs=5), "add_extra_convs='on_xxx'"),
])
def test_fpn_invalid_arguments(kwargs, case):
    """Mirrors mmdet test_necks.py::test_fpn's pytest.raises(AssertionError) cases:
    MoEFPN rejects every FPN argument combination that FPN rejects, the same way."""
    with pytest.raises(AssertionError):
        FPN(**FPN_BASE, **kwargs)
    with pytest.raises(AssertionError):
        MODELS.build(dict(type='MoEFPN', moe_parts=['output'], **FPN_BASE, **kwargs))


def test_fpn_moe_parts_must_exist():
    """MoE-only companion of test_fpn's end_level / add_extra_convs cases: 'extra'
    MoE parts need extra convs (none with end_level < last or add_extra_convs=False)."""
    for kwargs in (dict(start_level=1, end_level=2, num_outs=2),
                   dict(start_level=1, add_extra_convs=False, num_outs=5)):
        with pytest.raises(ValueError, match="'extra'"):
            MODELS.build(dict(type='MoEFPN', moe_parts=['extra'], **FPN_BASE, **kwargs))


def test_fpn_shared_gate():
    """Mirrors mmdet test_necks.py::test_fpn's add_extra_convs='on_output' case with
    shared_gate=True: one gate for all output convs (equal input channels), outputs
    still equal the dense FPN when upcycled; 'on_input' extras see 64 and 8 input
    channels, which a shared gate cannot serve."""
    kwargs = dict(start_level=1, add_extra_convs='on_output', num_outs=5, **FPN_BASE)
    moe = MODELS.build(dict(type='MoEFPN', moe_parts=['output', 'extra'],
                            shared_gate=True, **kwargs))
    gates = {id(m.gate) for m in moe.modules() if isinstance(m, MoEConv2d)}
    assert len(gates) == 2  # one for the output convs, one for the extra convs
    dense = FPN(**kwargs)
    upcycle(moe, dense)
    feats = fpn_feats()
    moe.eval(), dense.eval()
    with torch.no_grad():
        assert_nested_close(moe(feats), dense(feats), 'shared-gate MoEFPN vs FPN')
    with pytest.raises(ValueError, match='shared_gate'):
        MODELS.build(dict(type='MoEFPN', moe_parts=['extra'], shared_gate=True,
                          start_level=1, add_extra_convs='on_input', num_outs=5,
                          **FPN_BASE))


# --------------------------------------------------------------------------------------
# Single-stage detector cases (tests/test_models/test_detectors/test_single_stage.py,
# 'retinanet/retinanet_r18_fpn_1x_coco.py': ResNet-18 + FPN + RetinaHead)
# --------------------------------------------------------------------------------------
DETECTOR_VARIANTS = {
    'head-both-subnet+neck-output': (
        dict(moe_parts=['output'], balance_cfg=dict(importance=0.5)),
        dict(moe_branches='both', expert_type='subnet', balance_cfg=dict(importance=0.5))),
    'head-shared-subnet+neck-all': (
        dict(moe_parts=['lateral', 'output', 'extra'], num_experts=3, top_k=1,
             gate_cfg=dict(type='RelativeImportanceGate', threshold=0.3)),
        dict(moe_branches='shared', expert_type='subnet', balance_cfg=dict(kl_uniform=0.2))),
    'head-conv': (None, dict(moe_branches='cls', expert_type='conv', moe_convs=(0, 1))),
}


def detector_cfg(variant=None):
    """The RetinaNet-R18 config mmdet's test uses (via the project's toy config:
    ResNet-18, FPN on [64, 128, 256, 512]), made narrow for speed."""
    cfg = load_config(TOY_BASE_CONFIG).model
    cfg.neck.out_channels = 16
    cfg.bbox_head.update(in_channels=16, feat_channels=16, stacked_convs=2)
    cfg.test_cfg.update(score_thr=0.0, nms_pre=100, max_per_img=20)
    if variant is not None:
        neck, head = DETECTOR_VARIANTS[variant]
        cfg.type = 'MoERetinaNet'
        if neck is not None:
            cfg.neck.update(type='MoEFPN', **neck)
        cfg.bbox_head.update(type='MoERetinaHead', **head)
    return cfg


def dense_and_moe_detectors(variant):
    # no init_weights() on the dense model: torch's default init keeps the raw
    # outputs (and so the parity checks) far from zero
    dense = MODELS.build(detector_cfg())
    moe = upcycle(build_model(detector_cfg(variant)), dense)
    assert type(dense) is RetinaNet and isinstance(moe, MoERetinaNet)
    return dense, moe


def detector_inputs(model, training):
    """Two images of different sizes, as mmdet's test_single_stage.py feeds them."""
    packed = demo_mm_inputs(2, [[3, 128, 128], [3, 125, 130]],
                            num_classes=model.bbox_head.num_classes)
    return model.data_preprocessor(packed, training)


@pytest.mark.parametrize('variant', DETECTOR_VARIANTS)
def test_detector_init(variant):
    """Mirrors mmdet test_single_stage.py::test_init (RetinaNet-R18 config)."""
    model = build_model(detector_cfg(variant))
    assert model.backbone and model.neck and model.bbox_head
    assert isinstance(model.bbox_head, MoERetinaHead)
    assert isinstance(model.neck, MoEFPN) == (DETECTOR_VARIANTS[variant][0] is not None)


@pytest.mark.parametrize('variant', DETECTOR_VARIANTS)
def test_detector_forward_loss_mode(variant):
    """Mirrors mmdet test_single_stage.py::test_single_stage_forward_loss_mode (cpu):
    forward(mode='loss') returns a dict. Parity: loss_cls / loss_bbox of the upcycled
    MoERetinaNet equal the dense RetinaNet's; the loss_moe_* keys of every MoE part
    (neck and head) are added, finite and >= 0."""
    message_hub = MessageHub.get_instance(f'test_mmdet_cases-loss-{time.time()}')
    message_hub.update_info('iter', 0)
    message_hub.update_info('epoch', 0)
    dense, moe = dense_and_moe_detectors(variant)
    data = detector_inputs(dense, True)
    dense.train(), moe.train()
    want = dense.forward(**data, mode='loss')
    losses = moe.forward(**data, mode='loss')
    assert isinstance(losses, dict)
    for key in ('loss_cls', 'loss_bbox'):
        assert_close(summed(losses, key), summed(want, key), key)
    neck, head = DETECTOR_VARIANTS[variant]
    balance = set((head.get('balance_cfg') or {})) | set(((neck or {}).get('balance_cfg') or {}))
    moe_keys = {k for k in losses if k.startswith('loss_moe_')}
    assert moe_keys == {f'loss_moe_{k}' for k in balance}
    assert all(torch.isfinite(losses[k]) and losses[k] >= 0 for k in moe_keys)
    assert set(losses) - moe_keys == set(want)


@pytest.mark.parametrize('variant', DETECTOR_VARIANTS)
def test_detector_forward_predict_mode(variant):
    """Mirrors mmdet test_single_stage.py::test_single_stage_forward_predict_mode
    (cpu): eval, no_grad, forward(mode='predict') gives 2 DetDataSamples. Parity:
    the upcycled MoERetinaNet's detections (rescaled to the original image, as the
    detector does) equal the dense RetinaNet's, each tagged with its expert weights."""
    dense, moe = dense_and_moe_detectors(variant)
    data = detector_inputs(dense, False)
    dense.eval(), moe.eval()
    with torch.no_grad():  # predict writes into the data samples: one copy each
        results = moe.forward(**copy.deepcopy(data), mode='predict')
        wanted = dense.forward(**copy.deepcopy(data), mode='predict')
    assert len(results) == 2
    for b, result in enumerate(results):
        assert isinstance(result, DetDataSample)
        pred = result.pred_instances
        assert_same_detections(pred, wanted[b].pred_instances, f'image {b}')
        assert pred.expert_weights.shape[0] == len(pred)


@pytest.mark.parametrize('variant', DETECTOR_VARIANTS)
def test_detector_forward_tensor_mode(variant):
    """Mirrors mmdet test_single_stage.py::test_single_stage_forward_tensor_mode
    (cpu): forward(mode='tensor') returns a tuple. Parity: the upcycled
    MoERetinaNet's raw head outputs equal the dense RetinaNet's."""
    dense, moe = dense_and_moe_detectors(variant)
    data = detector_inputs(dense, False)
    dense.eval(), moe.eval()
    with torch.no_grad():
        outs = moe.forward(**data, mode='tensor')
        want = dense.forward(**data, mode='tensor')
    assert isinstance(outs, tuple)
    assert_nested_close(outs, want, "forward(mode='tensor')")
