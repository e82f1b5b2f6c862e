"""Capacity dispatch: a fixed number of rows per expert (static shapes, no host read),
rows over an expert's capacity dropped and counted; equal to exact dispatch when
nothing overflows."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmdet_moe.layers import MoE, MoEConv2d, dense_mixture, dispatch, dispatch_with_capacity


def linear_experts(num_experts, width=3, seed=0):
    torch.manual_seed(seed)
    return nn.ModuleList(nn.Linear(width, width) for _ in range(num_experts))


def first_rows_within_capacity(gates, capacity):
    """The paper-free reference: zero each expert's routed rows after its first
    ``capacity`` (row order), row by row in Python."""
    kept = gates.clone()
    for n in range(gates.shape[1]):
        seen = 0
        for b in range(gates.shape[0]):
            if gates[b, n] > 0:
                seen += 1
                if seen > capacity:
                    kept[b, n] = 0
    return kept


def test_equals_exact_dispatch_values_and_gradients_when_nothing_overflows():
    experts = linear_experts(4)
    x = torch.randn(6, 3, requires_grad=True)
    logits = torch.randn(6, 4, requires_grad=True)
    results = []
    for capacity in (None, 6, 100):
        top, idx = logits.topk(2, dim=1)
        gates = torch.zeros(6, 4).scatter(1, idx, top.softmax(1))
        run = lambda n, rows: experts[n](rows)  # noqa: E731
        if capacity is None:
            out = dispatch(x, gates, run)
        else:
            out, dropped = dispatch_with_capacity(x, gates, run, capacity)
            assert dropped.item() == 0
        grads = torch.autograd.grad(out.square().sum(), [x, logits, *experts.parameters()])
        results.append((out, grads))
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0])
        for got, want in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize('capacity', [1, 2, 3])
def test_overflow_dropped_in_row_order_and_counted(capacity):
    experts = linear_experts(3)
    torch.manual_seed(1)
    x = torch.randn(7, 3)
    gates = torch.rand(7, 3) * (torch.rand(7, 3) > 0.3)
    gates[:, 0] = 0.5  # every row routed to expert 0: 7 - capacity dropped there
    run = lambda n, rows: experts[n](rows)  # noqa: E731
    out, dropped = dispatch_with_capacity(x, gates, run, capacity)
    kept = first_rows_within_capacity(gates, capacity)
    torch.testing.assert_close(out, dense_mixture(x, kept, run))
    assert dropped.item() == int((gates > 0).sum() - (kept > 0).sum())
    assert dropped.item() >= 7 - capacity


def test_each_expert_runs_on_exactly_capacity_rows():
    gates = torch.tensor([[1., 0, 0], [1., 0, 0], [0, 1., 0]])
    seen = []
    dispatch_with_capacity(torch.randn(3, 2), gates,
                           lambda n, rows: seen.append((n, rows.shape[0])) or rows, 2)
    assert seen == [(0, 2), (1, 2), (2, 2)]  # static shapes, padded with weight 0


@pytest.mark.parametrize('capacity', [0, -1, 1.5, None])
def test_bad_capacity_is_named(capacity):
    with pytest.raises(ValueError, match=f'capacity must be an int >= 1.*{capacity}'):
        dispatch_with_capacity(torch.randn(2, 3), torch.ones(2, 2), lambda n, r: r, capacity)


@pytest.mark.parametrize('factor', [0, -0.5, float('nan'), float('inf'), '1', True])
def test_bad_capacity_factor_is_named(factor):
    with pytest.raises(ValueError, match=r'capacity_factor must be a finite number > 0.*'
                       + repr(factor).replace('(', r'\(').replace(')', r'\)')):
        MoE(expert_factory=lambda: nn.Conv2d(3, 3, 1), num_experts=4, in_channels=3,
            impl='dispatch', capacity_factor=factor)


@pytest.mark.parametrize('impl', ['fused', 'auto', 'dense'])
def test_capacity_factor_needs_dispatch(impl):
    with pytest.raises(ValueError, match=f"capacity_factor=1.25 applies to impl='dispatch'"
                       f".*impl='{'fused' if impl == 'auto' else impl}'"):
        MoE(expert_factory=lambda: nn.Conv2d(3, 3, 1), num_experts=4, in_channels=3,
            impl=impl, capacity_factor=1.25)
    if impl != 'auto':  # MoEConv2d: 'auto' is fused, named as given
        with pytest.raises(ValueError, match='capacity_factor=1.25 applies to'):
            MoEConv2d(3, 3, 1, impl=impl, capacity_factor=1.25)


@pytest.mark.parametrize('layer_type', ['MoE', 'MoEConv2d'])
def test_layers_drop_in_training_count_and_run_every_row_in_eval(layer_type):
    torch.manual_seed(0)
    kwargs = dict(num_experts=4, top_k=2, impl='dispatch', capacity_factor=0.5,
                  gate_cfg=dict(noisy=False))
    layer = (MoE(expert_factory=lambda: nn.Conv2d(3, 3, 3, padding=1), in_channels=3,
                 **kwargs) if layer_type == 'MoE' else MoEConv2d(3, 3, 3, padding=1, **kwargs))
    x = torch.randn(8, 3, 5, 5)
    capacity = math.ceil(0.5 * 8 * 2 / 4)  # 2 rows per expert, 16 routed pairs
    layer.train()
    gates = layer.gate(x).weights
    run = (layer._run_expert if layer_type == 'MoE' else layer.expert_forward)
    kept = first_rows_within_capacity(gates, capacity)
    torch.testing.assert_close(layer(x), dense_mixture(x, kept, run))
    dropped, routed = layer.pop_overflow().tolist()
    assert (dropped, routed) == (16 - (kept > 0).sum().item(), 16)
    assert dropped >= 16 - 4 * capacity
    layer(x)
    layer(x)
    assert layer.pop_overflow().tolist() == [2 * dropped, 32]  # summed until popped
    assert layer.pop_overflow() is None
    layer.eval()
    torch.testing.assert_close(layer(x), dense_mixture(x, gates, run))  # exact in eval
    assert layer.pop_overflow() is None


def test_conv_layer_matches_functional_form():
    layer = MoEConv2d(3, 4, 3, padding=1, num_experts=4, impl='dispatch', capacity_factor=1.0,
                      gate_cfg=dict(noisy=False)).train()
    x = torch.randn(6, 3, 4, 4)
    gates = layer.gate(x).weights
    want, _ = dispatch_with_capacity(x, gates, lambda n, r: F.conv2d(
        r, layer.weight[n], layer.bias[n], padding=1), math.ceil(6 * 2 / 4))
    torch.testing.assert_close(layer(x), want)


def test_every_expert_gets_a_gradient_so_ddp_needs_no_unused_parameter_search():
    """Each expert runs on its capacity rows (padded with weight 0) in every step, so
    DDP sees a gradient for every parameter even for experts nobody was routed to."""
    moe = MoE(expert_factory=lambda: nn.Conv2d(3, 3, 3, padding=1), num_experts=6,
              in_channels=3, top_k=1, impl='dispatch', capacity_factor=1.0,
              gate_cfg=dict(noisy=False, renormalize=False)).train()
    with torch.no_grad():
        moe.gate.w_gate.weight.zero_()
        moe.gate.w_gate.bias.copy_(torch.tensor([9., 0, 0, 0, 0, 0]))  # all to expert 0
    moe(torch.randn(4, 3, 5, 5)).sum().backward()
    assert all(p.grad is not None for p in moe.experts.parameters())
    assert all(not e.weight.grad.any() for e in list(moe.experts)[1:])  # zeros: not routed


def test_a_padding_row_the_expert_overflows_on_adds_nothing():
    """Expert 0 is padded with row 1 (not routed to it), where it returns inf:
    weight 0 must give 0 there, not inf · 0 = NaN."""
    x = torch.tensor([[1.], [0.], [0.]])
    gates = torch.tensor([[1., 0.], [0., 1.], [0., 1.]])
    experts = [lambda rows: 1 / rows, lambda rows: rows + 1]
    out, dropped = dispatch_with_capacity(x, gates, lambda n, rows: experts[n](rows), 2)
    assert out.flatten().tolist() == [1.0, 1.0, 1.0] and dropped.item() == 0
