import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmdet_moe.layers import MoEConv2d, dispatch, mixed_conv2d
from mmdet_moe.layers import base as moe_base

GEOMETRIES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=2, dilation=2, bias=False),
    dict(kernel_size=1, groups=2),
]


def reference_mixture(x, gates, weight, bias, **conv):
    """Σ_n g_bn (W_n ∗ x_b + b_n), image by image and expert by expert."""
    rows = []
    for b in range(x.shape[0]):
        y = 0
        for n in range(weight.shape[0]):
            b_n = None if bias is None else bias[n]
            y = y + gates[b, n] * F.conv2d(x[b:b + 1], weight[n], b_n, **conv)
        rows.append(y)
    return torch.cat(rows)


# N=4 < B·k = 10: the fused kernel mixes all N; N=16: only the B·k selected ones
@pytest.mark.parametrize('num_experts', [4, 16])
@pytest.mark.parametrize('geometry', GEOMETRIES)
def test_impls_agree_with_reference_values_and_gradients(geometry, num_experts):
    layer = MoEConv2d(4, 6, num_experts=num_experts, top_k=2, **geometry)
    conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                groups=layer.groups)
    layer.eval()  # deterministic gates
    x = torch.randn(5, 4, 9, 9)
    expected = reference_mixture(x, layer.gate(x).weights, layer.weight, layer.bias, **conv)
    grads = {}
    for impl in ['fused', 'dispatch', 'dense']:
        layer.zero_grad()
        layer.impl = impl
        y = layer(x)
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        # the gate parameters receive the same gradient through every path
        grads[impl] = {n: p.grad.clone() for n, p in layer.named_parameters()
                       if p.grad is not None}
    assert {'weight', 'gate.w_gate.weight', 'gate.w_gate.bias'} <= set(grads['fused'])
    for impl in ['dispatch', 'dense']:
        assert grads[impl].keys() == grads['fused'].keys()
        for name, want in grads['fused'].items():
            torch.testing.assert_close(grads[impl][name], want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('impl', ['fused', 'fused-k', 'dispatch'])
def test_gradcheck_float64(impl):
    x = torch.randn(2, 2, 4, 4, dtype=torch.double, requires_grad=True)
    weight = torch.randn(5, 3, 2, 3, 3, dtype=torch.double, requires_grad=True)
    bias = torch.randn(5, 3, dtype=torch.double, requires_grad=True)
    sparse = torch.tensor([[.3, .7, 0, 0, 0], [0, .4, .6, 0, 0]], dtype=torch.double)
    dense = torch.tensor([[.2, .5, .3, .1, .2], [.1, .4, .5, .3, .1]], dtype=torch.double,
                         requires_grad=True)

    def run(x, gates, weight, bias):
        if impl == 'fused':
            return mixed_conv2d(x, gates, weight, bias, 1, 1)
        if impl == 'fused-k':  # only the selected kernels mixed (B·k = 4 < N = 5)
            return mixed_conv2d(x, gates, weight, bias, 1, 1,
                                indices=torch.tensor([[1, 0], [2, 1]]))
        return dispatch(x, gates, lambda n, rows: F.conv2d(rows, weight[n], bias[n], padding=1))

    # routing is fixed by the zeros of the sparse gates; gate values vary where routed
    assert torch.autograd.gradcheck(lambda x, w, b: run(x, sparse, w, b), (x, weight, bias))
    assert torch.autograd.gradcheck(lambda g: run(x, g, weight, bias), (dense,))


def test_gate_and_only_routed_experts_get_gradients():
    layer = MoEConv2d(4, 4, 3, padding=1, num_experts=6, top_k=2, impl='dispatch',
                      gate_cfg=dict(noisy=False))
    with torch.no_grad():
        layer.gate.w_gate.weight.zero_()
        layer.gate.w_gate.bias.copy_(torch.tensor([0., 5, 4, -9, -9, -9]))
        layer.gate.w_gate.weight[2, 0] = 50.0  # channel-0 mean ±1: expert 2 first or last
    x = torch.randn(4, 4, 5, 5)
    x[:2, 0] += 1.0  # routed to experts 2 and 1
    x[2:, 0] -= 1.0  # routed to experts 1 and 0
    layer(x).square().sum().backward()
    per_expert = layer.weight.grad.flatten(1).abs().sum(1)
    assert (per_expert[:3] > 0).all()
    assert (per_expert[3:] == 0).all()
    assert layer.gate.w_gate.weight.grad.abs().sum() > 0


def test_from_dense_reproduces_the_dense_conv():
    dense = nn.Conv2d(6, 8, 3, stride=2, padding=1)
    x = torch.randn(3, 6, 11, 11)
    for mode in ['train', 'eval']:
        moe = MoEConv2d.from_dense(dense, num_experts=4, top_k=2)
        getattr(moe, mode)()
        torch.testing.assert_close(moe(x), dense(x), atol=1e-6, rtol=1e-5)
    noisy = MoEConv2d.from_dense(dense, num_experts=4, noise_std=0.1)
    assert not torch.equal(noisy.weight[0], noisy.weight[1])
    with pytest.raises(ValueError, match='Linear'):
        MoEConv2d.from_dense(nn.Linear(3, 3))


def test_aux_losses_follow_the_last_training_forward():
    layer = MoEConv2d(4, 4, 3, padding=1, num_experts=4, top_k=2,
                      balance_cfg=dict(importance=1.0))
    x1, x2 = torch.randn(3, 4, 6, 6), torch.randn(5, 4, 6, 6)
    layer(x1), layer(x2)  # e.g. two FPN levels of one step
    rows = torch.cat([layer._gate_outputs[0].weights, layer._gate_outputs[1].weights])
    w = rows.sum(0)
    assert layer.aux_losses()['importance'].item() == pytest.approx(
        (w.var() / (w.mean() ** 2 + 1e-10)).item(), rel=1e-5)
    layer(x1)  # next step starts afresh
    assert len(layer._gate_outputs) == 1
    layer.eval()
    layer.aux_losses()
    layer(x2)  # eval forwards keep nothing
    assert len(layer._gate_outputs) == 1


def test_uncollected_losses_raise(monkeypatch):
    monkeypatch.setattr(moe_base, 'MAX_UNCOLLECTED_CALLS', 3)
    layer = MoEConv2d(2, 2, 1, balance_cfg=dict(importance=1.0))
    x = torch.randn(2, 2, 3, 3)
    for _ in range(3):
        layer(x)
    with pytest.raises(RuntimeError, match='aux_losses'):
        layer(x)


@pytest.mark.parametrize('kwargs, match', [
    (dict(impl='fast'), "'fast'"),
    (dict(groups=3), 'groups=3'),
    (dict(num_experts=4, top_k=6), 'top_k'),
    (dict(balance_cfg=dict(load=1.0), gate_cfg=dict(noisy=False)), 'noisy'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEConv2d(4, 4, 3, **kwargs)
