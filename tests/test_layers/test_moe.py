import pytest
import torch
import torch.nn as nn

from mmdet_moe.layers import MoE, TopKGate


def subnet(channels=4):
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(channels, 3, 3, padding=1))


def reference(moe, x, weights):
    """Σ_n g_bn E_n(x_b) with every expert run on every image, separately."""
    return torch.stack([sum(weights[b, n] * moe.experts[n](x[b:b + 1])[0]
                            for n in range(moe.num_experts)) for b in range(x.shape[0])])


def test_dispatch_equals_reference_for_nonlinear_experts():
    moe = MoE(expert_factory=subnet, num_experts=4, in_channels=4, top_k=2).eval()
    assert moe.impl == 'dispatch'
    x = torch.randn(5, 4, 6, 6)
    torch.testing.assert_close(moe(x), reference(moe, x, moe.gate(x).weights),
                               atol=1e-6, rtol=1e-5)


def test_levels_share_one_gate_and_route_separately():
    moe = MoE(expert_factory=subnet, num_experts=4, in_channels=4, top_k=2,
              balance_cfg=dict(importance=1.0))
    levels = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4)]
    moe.eval()
    outs = moe(levels)
    for level, out in zip(levels, outs, strict=True):
        torch.testing.assert_close(out, reference(moe, level, moe.gate(level).weights),
                                   atol=1e-6, rtol=1e-5)
    moe.train()
    moe(levels)
    rows = moe._gate_outputs[0].weights
    assert rows.shape == (4, 4)  # losses see the rows of both levels together
    imp = rows.sum(0)
    assert moe.aux_losses()['importance'].item() == pytest.approx(
        (imp.var() / imp.mean() ** 2).item(), rel=1e-5)


def test_conv_experts_fuse_exactly():
    experts = [nn.Conv2d(4, 5, 3, padding=1) for _ in range(4)]
    fused = MoE(experts, in_channels=4, top_k=2).eval()
    assert fused.impl == 'fused'
    x = torch.randn(3, 4, 7, 7)
    gates = fused.gate(x).weights
    torch.testing.assert_close(fused(x), reference(fused, x, gates), atol=1e-5, rtol=1e-5)


def test_gate_output_can_be_reused_by_a_second_moe():
    cls = MoE(expert_factory=subnet, num_experts=3, in_channels=4, top_k=1)
    reg = MoE(expert_factory=subnet, num_experts=3, gate=cls.gate, top_k=1)
    x = torch.randn(2, 4, 5, 5)
    routing = cls.route(x)
    torch.testing.assert_close(reg(x, gate_output=routing),
                               reference(reg, x, routing.weights), atol=1e-6, rtol=1e-5)


def test_from_dense_is_exact():
    dense = subnet()
    moe = MoE.from_dense(dense, num_experts=4, top_k=2, in_channels=4)
    x = torch.randn(3, 4, 6, 6)
    torch.testing.assert_close(moe(x), dense(x), atol=1e-6, rtol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match='fused'):
        MoE(expert_factory=subnet, num_experts=4, in_channels=4, impl='fused')
    with pytest.raises(ValueError, match='expert 1'):
        MoE([subnet(4), subnet(6)], in_channels=4)
    with pytest.raises(ValueError, match='top_k'):
        MoE(expert_factory=subnet, num_experts=2, in_channels=4, top_k=3)
    with pytest.raises(ValueError, match='shared gate'):
        MoE(expert_factory=subnet, num_experts=3, gate=TopKGate(4, 4, 2), top_k=2)
    with pytest.raises(ValueError, match='either'):
        MoE(in_channels=4)


def test_mismatched_expert_outputs_raise():
    class Crop(nn.Module):
        def __init__(self, size):
            super().__init__()
            self.size = size

        def forward(self, x):
            return x[..., :self.size]
    moe = MoE([Crop(3), Crop(4)], in_channels=4, top_k=2)
    with pytest.raises(ValueError, match='experts must agree'):
        moe(torch.randn(2, 4, 5, 5))
