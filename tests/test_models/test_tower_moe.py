"""Whole-subnet experts by path (``expert='subnet'``): a head's tower becomes N routed
copies of itself, for any head that runs it in order.

The independent computation is the stock mmdet detector: upcycled from it (identical
experts, gate noise off), the MoE detector gives its losses and detections; the
parameters are re-drawn at a realistic scale so that scores spread over (0, 1).
"""
import copy
import pickle
import re

import pytest
import torch
import torch.nn as nn
from mmengine.config import ConfigDict
from mmengine.runner.checkpoint import load_state_dict as mmengine_load_state_dict

from helpers import (all_finite, assert_losses_equal_dense, build_model, one_training_step,
                     redraw_parameters, stock_model_cfg)
from mmdet_moe.layers import record_gates
from mmdet_moe.models import OutputInExperts, TowerMoE, insert_moe_layers

WIDTH = 64  # GN with 32 groups needs 2+ channels per group on 1×1 maps of one image
NOISELESS = dict(type='TopKGate', noisy=False)
MOE = dict(expert='subnet', num_experts=3, top_k=2, gate_cfg=NOISELESS,
           balance_cfg=dict(importance=0.5))
RETINANET = 'retinanet/retinanet_r50_fpn_1x_coco.py'
FCOS = 'fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py'
ATSS = 'atss/atss_r50_fpn_1x_coco.py'
GFL = 'gfl/gfl_r50_fpn_1x_coco.py'
TOOD = 'tood/tood_r50_fpn_1x_coco.py'
BOTH = ['bbox_head.cls_convs', 'bbox_head.reg_convs']

CASES = {
    'retinanet': (RETINANET, [dict(paths=BOTH)]),
    'fcos': (FCOS, [dict(paths='bbox_head.*_convs')]),
    'atss': (ATSS, [dict(paths=BOTH)]),
    'gfl': (GFL, [dict(paths=BOTH)]),
    # the output conv joins the experts (as in MoERetinaHead)
    'retinanet-output': (RETINANET, [dict(paths='bbox_head.cls_convs', output='retina_cls'),
                                     dict(paths='bbox_head.reg_convs',
                                          output='bbox_head.retina_reg')]),
    'atss-output': (ATSS, [dict(paths='bbox_head.cls_convs', output='atss_cls'),
                           dict(paths='bbox_head.reg_convs')]),
    'gfl-output': (GFL, [dict(paths='bbox_head.cls_convs', output='gfl_cls'),
                         dict(paths='bbox_head.reg_convs', output='gfl_reg')]),
}


def moe_cfg(path, specs, width=WIDTH, train_only_moe=False, **moe):
    return ConfigDict(type='MoEDetector', detector=stock_model_cfg(path, width),
                      moe_layers=[dict(MOE, **moe, **spec) for spec in specs],
                      train_only_moe=train_only_moe)


def build(cfg):
    """Build as the Runner does, without init_weights (whose log lists every
    parameter): for models whose weights are loaded or re-drawn."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    return MODELS.build(cfg)


def towers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, TowerMoE)}


@pytest.fixture(scope='module', params=sorted(CASES))
def pair(request):
    """(name, dense model, MoE model upcycled from its state dict), in eval mode."""
    path, specs = CASES[request.param]
    dense = build(stock_model_cfg(path, WIDTH))
    redraw_parameters(dense)
    moe = build(moe_cfg(path, specs))
    missing, unexpected = moe.load_state_dict(dense.state_dict(), strict=False)
    assert unexpected == [] and missing and all('.gate.' in k for k in missing), missing
    return request.param, dense.eval(), moe.eval()


def batch(model, train=False):
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(0)
    packed = demo_mm_inputs(2, [(3, 80, 64), (3, 64, 72)], num_items=[4, 4], num_classes=5)
    for sample, scale in zip(packed['data_samples'], [(0.5, 0.4), (1.25, 1.5)]):
        sample.set_metainfo(dict(scale_factor=scale))
    return model.data_preprocessor(packed, train)


def test_dense_checkpoint_upcycles_every_expert(pair):
    name, dense, moe = pair
    head, dense_head = moe.bbox_head, dense.bbox_head
    assert set(towers(moe)) == set(BOTH)
    for path, tower in towers(moe).items():
        tower_name = path.split('.')[-1]
        want = {f'{k}': v for k, v in getattr(dense_head, tower_name).state_dict().items()}
        if tower.output_name:
            assert isinstance(getattr(head, tower.output_name), OutputInExperts)
            want.update({f'{tower.output_name}.{k}': v for k, v in
                         getattr(dense_head, tower.output_name).state_dict().items()})
        for expert in tower.experts:
            got = expert.state_dict()
            assert set(got) == set(want)
            assert all(torch.equal(got[k], want[k]) for k in want)
    # every other key is the dense model's, unchanged
    moe_state = moe.state_dict()
    for key, value in dense.state_dict().items():
        if not any(key.startswith(f'bbox_head.{part}') for part in (
                'cls_convs.', 'reg_convs.') + tuple(f'{t.output_name}.' for t in
                                                   towers(moe).values() if t.output_name)):
            assert torch.equal(moe_state[key], value), key


def test_reloads_its_own_state_pickles_and_upcycles_through_mmengine():
    path, specs = CASES['retinanet-output']
    dense = build(stock_model_cfg(path, WIDTH))
    redraw_parameters(dense)
    moe = build_model(moe_cfg(path, specs, upcycle_noise_std=0.1))
    # init_weights gives every expert's output conv the head's override for it
    # (RetinaHead: the focal-loss prior on retina_cls's bias)
    for expert in moe.bbox_head.cls_convs.experts:
        torch.testing.assert_close(expert.retina_cls.bias,
                                   torch.full((9 * 5,), -4.59511985), atol=1e-6, rtol=0)
    # a MoE checkpoint round-trips (its keys are not taken for dense ones)
    fresh = build(moe_cfg(path, specs))
    fresh.load_state_dict(moe.state_dict(), strict=True)
    for key, value in moe.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    # pickled / deep-copied models still upcycle (the owner's pre-hook survives),
    # and so does mmengine's loader (load_from, init_detector)
    for copied in (pickle.loads(pickle.dumps(fresh)), copy.deepcopy(fresh)):
        missing, unexpected = copied.load_state_dict(dense.state_dict(), strict=False)
        assert unexpected == [] and all('.gate.' in k for k in missing)
        head = copied.bbox_head
        assert torch.equal(head.cls_convs.experts[2].retina_cls.weight,
                           dense.bbox_head.retina_cls.weight)
    mmengine_load_state_dict(moe, dense.state_dict())
    # upcycle_noise_std=0.1: each expert a different noisy copy of the dense weights
    for tower, output in ((moe.bbox_head.reg_convs, 'retina_reg'),
                          (moe.bbox_head.cls_convs, 'retina_cls')):
        dense_weights = {'0': getattr(dense.bbox_head, tower.tower_name)[0].conv.weight,
                         output: getattr(dense.bbox_head, output).weight}
        assert not torch.equal(tower.experts[0][0].conv.weight,
                               tower.experts[1][0].conv.weight)
        for expert in tower.experts:
            for child, want in dense_weights.items():
                got = getattr(expert, child)
                got = got.conv.weight if child == '0' else got.weight
                assert 0.05 < float((got - want).std() / want.std()) < 0.2, child


def test_loss_equals_dense(pair):
    name, dense, moe = pair
    assert_losses_equal_dense(dense, moe, lambda m: batch(m, train=True), name)


def test_predict_equals_dense_and_tags_detections(pair):
    name, dense, moe = pair
    data = batch(dense)
    with torch.no_grad():
        # forward, as the runner calls it: it names the MoE layers in expert_layers
        want, got = (model(data['inputs'], copy.deepcopy(data['data_samples']),
                           mode='predict') for model in (dense, moe))
    assert sum(len(w.pred_instances) for w in want) > 0
    for g, w in zip(got, want, strict=True):
        g, w = g.pred_instances, w.pred_instances
        assert len(g) == len(w)
        if not len(w):
            continue
        # each detection has its twin on the other side (order is free among ties)
        distance = ((g.bboxes[:, None] - w.bboxes[None]).abs().amax(-1) +
                    100 * (g.scores[:, None] - w.scores[None]).abs() +
                    1e3 * (g.labels[:, None] != w.labels[None]))
        assert distance.min(1).values.max() < 5e-3
        assert distance.min(0).values.max() < 5e-3
        # the detections carry the gates of their (image, level), one row per tower
        assert g.expert_weights.shape == (len(g), 2, 3)
        assert g.metainfo['expert_layers'] == BOTH


def test_gate_runs_once_per_level_in_level_order():
    model = build(moe_cfg(RETINANET, [dict(paths=BOTH)], width=32)).eval()
    seen = []
    gate = model.bbox_head.cls_convs.gate
    gate.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad(), record_gates(model) as recorder:
        feats = model.extract_feat(x)
        model.bbox_head(feats)
    assert seen == [f.shape for f in feats]  # one call per level, P3 … P7
    records = recorder.records
    assert [r.name for r in records] == BOTH * 5  # per level: cls tower, then reg tower
    cls_records = [r for r in records if r.name == 'bbox_head.cls_convs']
    assert [r.call for r in cls_records] == list(range(5))
    assert all(r.level is None and r.weights.shape == (2, 3) for r in cls_records)
    with torch.no_grad():  # each level's rows are the gate of that level alone
        torch.testing.assert_close(cls_records[3].weights, gate(feats[3]).weights)


def test_training_step_and_hard_constraint_sequence():
    model = build_model(moe_cfg(RETINANET, [dict(paths=BOTH)], width=32,
                                gate_cfg=dict(type='TopKGate', noisy=True)))
    losses, _ = one_training_step(model, image_size=64)
    assert 'loss_moe_importance' in losses and all_finite(losses)
    tower = model.bbox_head.cls_convs
    assert tower.gate.w_gate.weight.grad is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in tower.experts.parameters())
    # a hard-constraint gate is updated once per level, after each level (the paper)
    hard = build(moe_cfg(RETINANET, [dict(paths='bbox_head.cls_convs')], width=32,
                               gate_cfg=dict(type='RelativeImportanceGate'),
                               balance_cfg=None, train_only_moe=True))
    losses, _ = one_training_step(hard, image_size=64)
    gate = hard.bbox_head.cls_convs.gate
    assert int(gate.num_updates) == 5 and int(gate.num_iters) == 1
    assert not any(k.startswith('loss_moe') for k in losses)
    trainable = {n for n, p in hard.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith('bbox_head.cls_convs.') for n in trainable)


# --- a tower called as an nn.Sequential, and owners that do not run towers in order


class SequentialHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.tower = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, feats):
        return [self.out(self.tower(x)) for x in feats]


class TwiceHead(SequentialHead):
    def forward(self, x):
        y = self.tower(x)
        return self.out(self.tower(y))


class CountingHead(SequentialHead):
    def forward(self, x):
        for layer in self.tower:
            x = layer(x)
        return self.out(x) * len(self.tower)


class KeepingHead(SequentialHead):
    def __init__(self):
        super().__init__()
        self.mix = nn.Conv2d(4 * 8, 8, 1)

    def forward(self, x):
        feats = []
        for layer in self.tower:
            x = layer(x)
            feats.append(x)
        return self.out(self.mix(torch.cat(feats, 1)))


class Model(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, feats):
        return self.head(feats)


def test_sequential_tower_with_output_conv():
    model = Model(SequentialHead())
    dense = copy.deepcopy(model)
    insert_moe_layers(model, [dict(paths='head.tower', output='out', **MOE)])
    feats = [torch.randn(3, 8, 16, 16), torch.randn(3, 8, 8, 8)]
    with torch.no_grad():  # experts are copies of the tower: identical at insertion
        for got, want in zip(model(feats), dense(feats), strict=True):
            torch.testing.assert_close(got, want)
    assert set(dense.state_dict()) - set(model.state_dict()) == {
        'head.tower.0.weight', 'head.tower.0.bias', 'head.tower.2.weight',
        'head.tower.2.bias', 'head.out.weight', 'head.out.bias'}
    fresh = Model(SequentialHead())
    insert_moe_layers(fresh, [dict(paths='head.tower', output='head.out', **MOE)])
    missing, unexpected = fresh.load_state_dict(dense.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith('head.tower.gate.') for k in missing)
    assert torch.equal(fresh.head.tower.experts[1].out.weight, dense.head.out.weight)


def _model(path):
    return build(stock_model_cfg(path, 32))


@pytest.mark.parametrize('make, spec, match', [
    # TOOD keeps every intermediate feature of inter_convs (declared)
    (lambda: _model(TOOD), dict(paths='bbox_head.inter_convs'),
     r"moe_layers\[0\] at 'bbox_head.inter_convs': TOODHead does not run the tower only "
     r'as `for layer in self.inter_convs: x = layer\(x\)`.*: it keeps every intermediate '
     r"feature of its loop.*use expert='conv' on bbox_head.inter_convs.\*.conv"),
    # not a tower
    (lambda: _model(RETINANET), dict(paths='bbox_head.cls_convs.0'),
     r"needs a tower .*got a ConvModule; name the tower 'bbox_head.cls_convs'"),
    (lambda: _model(RETINANET), dict(paths='bbox_head.retina_cls'),
     r"got a Conv2d; for one conv use expert='conv' on bbox_head.retina_cls"),
    (lambda: _model(RETINANET), dict(paths='bbox_head.towers'),
     r"'bbox_head.towers' matches no module.*tower paths include"),
    # wrong output paths
    (lambda: _model(RETINANET), dict(paths='bbox_head.cls_convs', output='bbox_head.cls'),
     r"RetinaHead at 'bbox_head' has no module 'cls'.*\['retina_cls', 'retina_reg'\]"),
    (lambda: _model(RETINANET), dict(paths='bbox_head.cls_convs', output='neck.retina_cls'),
     r"must sit beside the tower, in 'bbox_head' \(e.g. output='retina_cls'\)"),
    (lambda: _model(RETINANET), dict(paths='bbox_head.*_convs', output='retina_cls'),
     'names one conv but paths match 2 towers'),
    # settings of the other kind of expert
    (lambda: _model(RETINANET), dict(paths='bbox_head.cls_convs', type='MoEConv2d'),
     r"moe_layers\[0\].type is not a setting of expert='subnet'"),
    (lambda: _model(RETINANET), dict(paths=BOTH, shared_gate=True),
     r"shared_gate is not a setting of expert='subnet'"),
    (lambda: _model(RETINANET), dict(paths='bbox_head.cls_convs', rank=4),
     r"\['rank'\] are not settings of expert='subnet'"),
    (lambda: _model(RETINANET), dict(paths='bbox_head.cls_convs.0.conv', expert='conv',
                                     output='retina_cls'), "output needs expert='subnet'"),
    (lambda: _model(RETINANET), dict(paths='bbox_head.cls_convs', expert='tower'),
     r"expert='tower' is unknown"),
    (lambda: _model(RETINANET), dict(paths='bbox_head.cls_convs', num_experts=2, top_k=3),
     r"'bbox_head.cls_convs': top_k must be an int in \[1, num_experts=2\]"),
])
def test_bad_specs_fail_at_build_naming_the_path(make, spec, match):
    """What the module structure shows is refused before anything changes."""
    model = make()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=match):
        insert_moe_layers(model, [dict(dict(expert='subnet'), **spec)])
    assert {n: type(m) for n, m in model.named_modules()} == before  # nothing replaced


def _images(model):
    """The head as loss and predict call it (``_forward`` calls ``bbox_head.forward``,
    past the module hooks)."""
    with torch.no_grad():
        return model.bbox_head(model.extract_feat(torch.randn(1, 3, 64, 64)))


@pytest.mark.parametrize('make, spec, run, match', [
    # FPN indexes its fpn_convs
    (lambda: _model(RETINANET), dict(paths='neck.fpn_convs'), _images,
     r"moe_layers\[0\] at 'neck.fpn_convs': FPN does not run the tower only as `for layer "
     r"in self.fpn_convs: x = layer\(x\)`.*: it indexes it \(\[0\]: runs single layers\)"
     r".*use expert='conv' on neck.fpn_convs.\*.conv"),
    # the output conv named is not the one applied to the tower's output
    (lambda: _model(RETINANET), dict(paths='bbox_head.cls_convs', output='retina_reg'),
     _images, r"RetinaHead passes the output of cls_convs to retina_cls besides "
     r"'retina_reg': the output conv 'retina_reg' must be called exactly once on the "
     r'output of cls_convs.*leave output unset'),
    # the tower's output is used beyond the output conv (FCOS, ATSS: centerness)
    (lambda: _model(FCOS), dict(paths='bbox_head.cls_convs', output='conv_cls'), _images,
     r"FCOSHead passes the output of cls_convs to conv_centerness besides 'conv_cls'"),
    (lambda: _model(ATSS), dict(paths='bbox_head.reg_convs', output='atss_reg'), _images,
     r"ATSSHead passes the output of reg_convs to atss_centerness besides 'atss_reg'"),
    # owners that run the tower twice, or measure it
    (lambda: Model(TwiceHead()), dict(paths='head.tower'),
     lambda model: model(torch.randn(2, 8, 6, 6)),
     r'TwiceHead .*: it runs it on its own output \(at several places or twice in a row\)'),
    (lambda: Model(CountingHead()), dict(paths='head.tower'),
     lambda model: model(torch.randn(2, 8, 6, 6)), r'CountingHead .*: it measures it \(len'),
])
def test_misuse_in_the_owners_code_fails_at_the_first_forward(make, spec, run, match):
    """How the owner's code runs the tower shows at its first forward (no source is
    read): the first call that shows a misuse raises, naming the path."""
    model = make()
    insert_moe_layers(model, [dict(MOE, **spec)])
    with pytest.raises(ValueError, match=match):
        run(model)
    with pytest.raises(ValueError, match=match):  # until a forward passes, it checks
        run(model)


def test_an_owner_keeping_intermediate_features_fails_with_a_note_naming_the_tower():
    """KeepingHead keeps every intermediate feature of its tower's loop (a tower run as
    one layer gives one): its layer that receives them fails, and the error says why."""
    model = Model(KeepingHead())
    insert_moe_layers(model, [dict(MOE, paths='head.tower')])
    with pytest.raises(RuntimeError) as error:
        model(torch.randn(2, 8, 6, 6))
    note, = error.value.__notes__
    assert re.match(
        r"mmdet_moe: moe_layers\[0\] at 'head.tower': KeepingHead did not pass the output "
        r'of the tower MoE tower to a module as it is: it may keep or combine what the '
        r'tower returns \(e.g. every intermediate feature of its loop\)', note), note


def test_the_check_stops_after_a_forward_that_ran_the_tower():
    model = Model(SequentialHead())
    insert_moe_layers(model, [dict(paths='head.tower', output='out', **MOE)])
    check = model.head.tower.call_check
    with torch.no_grad():
        model([])  # the tower did not run: still checking
        assert check.armed
        model([torch.randn(1, 8, 4, 4)])
    assert not check.armed
    with pytest.raises(ValueError, match=r"'head.tower': SequentialHead .* it indexes it"):
        model.head.tower[0]


def test_shared_tower_is_refused():
    model = Model(SequentialHead())
    model.other = model.head.tower
    with pytest.raises(ValueError, match=r"'head.tower' is also at \['other'\]"):
        insert_moe_layers(model, [dict(paths='head.tower', expert='subnet')])


def test_a_pruned_tower_upcycles_a_dense_checkpoint_into_its_remaining_experts():
    """MoEDetector(expert_counts=...) keeps 2 of 3 experts: a dense checkpoint's output
    conv goes to those 2 (not to a removed third one, an unexpected key)."""
    dense = build(stock_model_cfg(RETINANET, WIDTH))
    cfg = moe_cfg(RETINANET, [dict(paths='bbox_head.cls_convs', output='retina_cls')])
    cfg.expert_counts = {'bbox_head.cls_convs': 2}
    moe = build(cfg)
    missing, unexpected = moe.load_state_dict(dense.state_dict(), strict=False)
    assert unexpected == [] and all('.gate.' in key for key in missing)
    for expert in moe.bbox_head.cls_convs.experts:
        assert torch.equal(expert.retina_cls.weight, dense.bbox_head.retina_cls.weight)
