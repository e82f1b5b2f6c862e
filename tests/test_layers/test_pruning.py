"""Pruning experts from MoE layers and folding MoEConv2d experts into one conv."""
import pytest
import torch
from torch import nn

from mmdet_moe.layers import CPMuMoEConv2d, MoE, MoEConv2d
from mmdet_moe.layers.pruning import (gate_groups, merged_conv, prune_experts,
                                      prune_model_experts)

NEVER = -1e4  # a gate bias that keeps an expert out of every top k


def never_routed(layer, expert):
    with torch.no_grad():
        layer.gate.w_gate.bias[expert] = NEVER
    return layer


def test_pruning_a_never_routed_conv_expert_keeps_the_outputs():
    torch.manual_seed(0)
    layer = never_routed(MoEConv2d(6, 5, 3, padding=1, num_experts=4, top_k=2,
                                   gate_cfg=dict(noisy=True)), 1).eval()
    x = torch.randn(8, 6, 7, 7)
    before = layer(x)
    weights, noise = layer.weight.detach().clone(), layer.gate.w_noise.weight.detach().clone()
    prune_experts(layer, [0, 2, 3])
    assert layer.num_experts == 3 and layer.gate.num_experts == 3
    assert torch.equal(layer.weight, weights[[0, 2, 3]])
    assert torch.equal(layer.gate.w_noise.weight, noise[[0, 2, 3]])
    assert layer.gate.w_gate.weight.shape == (3, 6)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-6)
    layer.train()
    loss = layer(x).sum()  # still trains
    loss.backward()
    assert layer.weight.grad.shape == (3, 5, 6, 3, 3)


def test_pruning_subnet_experts_on_fpn_levels_keeps_the_outputs():
    torch.manual_seed(0)
    layer = MoE(expert_factory=lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1),
                                                     nn.ReLU(), nn.Conv2d(4, 3, 1)),
                num_experts=5, in_channels=4, top_k=2)
    never_routed(layer, 0)
    never_routed(layer, 3)
    layer.eval()
    levels = [torch.randn(3, 4, 8, 8), torch.randn(3, 4, 4, 4)]
    before = layer(levels)
    kept = layer.experts[4]
    prune_experts(layer, [1, 2, 4])
    assert len(layer.experts) == 3 and layer.experts[2] is kept
    for got, want in zip(layer(levels), before):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_pruning_keeps_the_hard_constraint_statistic_of_the_kept_experts():
    layer = MoEConv2d(4, 4, 1, num_experts=4, top_k=1,
                      gate_cfg=dict(type='RelativeImportanceGate', threshold=0.3,
                                    renormalize=False))
    layer.gate.usage.copy_(torch.tensor([0.5, -1.0, 2.0, 0.25]))
    prune_experts(layer, [0, 2, 3])
    assert layer.gate.usage.tolist() == [0.5, 2.0, 0.25]
    assert set(layer.state_dict()) >= {'gate.usage', 'gate.num_iters'}


@pytest.mark.parametrize('keep,message', [([0], 'fewer than top_k=2'),
                                          ([2, 1], 'increasing order'),
                                          ([0, 4], r'in \[0, 4\)')])
def test_bad_expert_lists_are_refused_and_change_nothing(keep, message):
    layer = MoEConv2d(4, 4, 1, num_experts=4, top_k=2)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=message) as err:
        prune_experts(layer, keep, 'neck.fpn_convs.0.conv')
    assert 'neck.fpn_convs.0.conv' in str(err.value)
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())


def test_layers_without_discrete_experts_are_refused():
    layer = CPMuMoEConv2d(4, 4, 3, padding=1, num_experts=8)
    with pytest.raises(ValueError, match='head.conv: a CPMuMoEConv2d has no discrete experts'):
        prune_experts(layer, [0, 1], 'head.conv')


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = MoEConv2d(4, 4, 1, num_experts=4, top_k=2)
        self.b = MoEConv2d(4, 4, 1, num_experts=4, top_k=2)
        self.b.gate = self.a.gate
        self.c = MoEConv2d(4, 4, 1, num_experts=4, top_k=2)


def test_layers_sharing_a_gate_are_pruned_together_and_the_gate_once():
    model = TwoLayers()
    assert gate_groups(model) == {'a': ['a', 'b'], 'c': ['c']}
    with pytest.raises(ValueError, match='a and b share one gate'):
        prune_model_experts(model, {'a': [0, 1, 2]})
    assert model.a.num_experts == 4  # nothing changed
    prune_model_experts(model, {'a': [0, 1, 2], 'b': [0, 1, 2], 'c': [1, 3]})
    assert model.a.gate is model.b.gate and model.a.gate.w_gate.out_features == 3
    assert model.b.weight.shape[0] == 3 and model.c.weight.shape[0] == 2
    with pytest.raises(ValueError, match="'d' is not a MoE module"):
        prune_model_experts(model, {'d': [0, 1]})


def test_merged_conv_is_the_conv_of_the_mean_gates():
    torch.manual_seed(0)
    layer = MoEConv2d(6, 4, 3, stride=2, padding=1, num_experts=3, top_k=2)
    gates = torch.tensor([0.5, 0.2, 0.3])
    x = torch.randn(2, 6, 9, 9)
    # independently: each expert as its own conv, summed with the gate weights
    want = sum(g * conv(x) for g, conv in zip(gates, layer.expert_convs()))
    torch.testing.assert_close(merged_conv(layer, gates)(x), want, rtol=1e-5, atol=1e-5)


def test_merged_conv_of_an_equal_weight_layer_computes_what_the_layer_does():
    torch.manual_seed(0)
    layer = MoEConv2d(6, 4, 3, padding=1, num_experts=4, top_k=4, bias=False,
                      gate_cfg=dict(type='EqualWeightGate')).eval()
    x = torch.randn(3, 6, 5, 5)
    conv = merged_conv(layer, torch.full((4,), 0.25))
    assert type(conv) is nn.Conv2d and conv.bias is None
    torch.testing.assert_close(conv(x), layer(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='4 finite weights'):
        merged_conv(layer, torch.tensor([0.5, 0.5]))
