"""override_routing(equal_weights=True): every expert, weight 1/N, no gate (the paper's
"all experts averaged" baseline), checked against the experts run by hand."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmdet_moe.layers import (CPMuMoE, CPMuMoEConv2d, MoE, MoEConv2d, TRMuMoEConv2d,
                              override_routing, record_gates)


def mean_of_experts(experts, x):
    return torch.stack([e(x) for e in experts]).mean(0)


@pytest.mark.parametrize('impl', ['dispatch', 'dense', 'fused'])
@pytest.mark.parametrize('gate_cfg', [
    None, dict(type='RelativeImportanceGate', threshold=0.3),
    dict(type='EqualWeightGate')])
def test_moe_of_conv_experts_equals_the_mean_of_its_experts(impl, gate_cfg):
    top_k = 4 if gate_cfg and gate_cfg['type'] == 'EqualWeightGate' else 2
    moe = MoE(expert_factory=lambda: nn.Conv2d(4, 3, 3, padding=1), num_experts=4,
              in_channels=4, top_k=top_k, gate_cfg=gate_cfg, impl=impl).eval()
    x = torch.randn(3, 4, 8, 8)
    learned = moe(x)
    with override_routing(moe, equal_weights=True):
        out = moe.gate(x)
        assert torch.equal(out.weights, torch.full((3, 4), 0.25))
        assert out.indices.tolist() == [[0, 1, 2, 3]] * 3
        torch.testing.assert_close(moe(x), mean_of_experts(moe.experts, x))
        # FPN levels: one shared gate, every (image, level) row to all experts
        levels = moe([x, x[..., :4, :4]])
        torch.testing.assert_close(levels[1], mean_of_experts(moe.experts, x[..., :4, :4]))
    torch.testing.assert_close(moe(x), learned)  # restored
    assert moe.gate.forced_expert is None


def test_non_linear_experts_and_a_gate_shared_by_two_moes():
    def subnet():
        return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    cls = MoE(expert_factory=subnet, num_experts=3, in_channels=4, top_k=2)
    reg = MoE(expert_factory=subnet, num_experts=3, gate=cls.gate, top_k=2)
    model = nn.ModuleDict(dict(cls=cls, reg=reg)).eval()
    x = torch.randn(2, 4, 6, 6)
    with override_routing(model, equal_weights=True):
        for moe in (cls, reg):
            torch.testing.assert_close(moe(x), mean_of_experts(moe.experts, x))


def test_moe_conv2d_equals_the_conv_with_the_mean_kernel():
    layer = MoEConv2d(4, 6, 3, stride=2, padding=1, num_experts=5, top_k=2).eval()
    x = torch.randn(2, 4, 9, 9)
    expected = F.conv2d(x, layer.weight.mean(0), layer.bias.mean(0), stride=2, padding=1)
    for impl in ('fused', 'dispatch', 'dense'):
        layer.impl = impl
        with override_routing(layer, equal_weights=True):
            torch.testing.assert_close(layer(x), expected)


def test_hard_constraint_state_untouched_and_recorded_weights_uniform():
    layer = MoEConv2d(4, 4, 3, padding=1, num_experts=4, top_k=2,
                      gate_cfg=dict(type='RelativeImportanceGate', threshold=0.3)).train()
    x = torch.randn(3, 4, 6, 6)
    with override_routing(layer, equal_weights=True), record_gates(layer) as rec:
        layer(x)
    assert torch.equal(layer.gate.usage, torch.zeros(4))
    assert torch.equal(rec.records[0].weights, torch.full((3, 4), 0.25))


@pytest.mark.parametrize('gate_mode', ['pixel', 'image'])
@pytest.mark.parametrize('cls', [CPMuMoEConv2d, TRMuMoEConv2d])
def test_mumoe_conv_mixes_its_experts_uniformly(cls, gate_mode):
    layer = cls(4, 5, 3, padding=1, num_experts=6, gate_mode=gate_mode).eval()
    nn.init.normal_(layer.gate_weight)  # a gate that is not uniform already
    x = torch.randn(2, 4, 7, 7)
    learned = layer(x)
    weight, bias = layer.materialize()  # (N, O, I, k, k), (N, O)
    expected = F.conv2d(x, weight.mean(0), bias.mean(0), padding=1)
    assert not torch.allclose(learned, expected, atol=1e-4)
    with override_routing(layer, equal_weights=True):
        gates = layer.gate_weights(x)
        assert torch.allclose(gates, torch.full_like(gates, 1 / 6))
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
    assert 'gate_weights' not in vars(layer)  # the class method is back
    torch.testing.assert_close(layer(x), learned)


def test_mumoe_token_form():
    layer = CPMuMoE(6, 3, num_experts=4, rank=5).eval()
    nn.init.normal_(layer.gate_weight)
    z = torch.randn(5, 6)
    weight = layer.materialize()  # ((I + 1), O) per expert, the bias row last
    with override_routing(layer, equal_weights=True):
        out = layer(z)
    w = weight.mean(0)
    torch.testing.assert_close(out, z @ w[:-1] + w[-1], rtol=1e-4, atol=1e-5)


def test_restored_when_the_block_raises():
    model = nn.ModuleDict(dict(
        conv=MoEConv2d(4, 4, 3, padding=1, num_experts=3, top_k=2),
        mu=CPMuMoEConv2d(4, 4, 3, padding=1, num_experts=3, rank=2))).eval()
    with pytest.raises(RuntimeError, match='inside'):
        with override_routing(model, equal_weights=True):
            assert model['conv'].gate.forced_expert == 'equal_weights'
            raise RuntimeError('inside')
    assert model['conv'].gate.forced_expert is None and 'gate_weights' not in vars(model['mu'])


@pytest.mark.parametrize('kwargs, match', [
    (dict(), 'exactly one of expert=, top_k= or equal_weights=True; got none'),
    (dict(expert=1, equal_weights=True), "got expert=1, equal_weights=True"),
    (dict(expert=0, top_k=2), 'got expert=0, top_k=2'),
    (dict(equal_weights='yes'), "equal_weights must be True or False, got 'yes'"),
    (dict(expert=1.0), 'expert must be an int, got 1.0'),
    (dict(top_k=True), 'top_k must be an int, got True'),
])
def test_bad_modes_name_the_value(kwargs, match):
    layer = MoEConv2d(4, 4, 3, padding=1, num_experts=3, top_k=2)
    with pytest.raises(ValueError, match=match):
        with override_routing(layer, **kwargs):
            pass
    assert layer.gate.forced_expert is None


def test_no_moe_is_an_error():
    with pytest.raises(ValueError, match='Conv2d has no MoE layer'):
        with override_routing(nn.Conv2d(1, 1, 1), equal_weights=True):
            pass
