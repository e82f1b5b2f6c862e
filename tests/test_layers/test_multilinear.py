import pytest
import torch
import torch.nn.functional as F

from mmdet_moe.layers import (CPMuMoE, CPMuMoEConv2d, TRMuMoE, TRMuMoEConv2d,
                              rank_for_params)


@pytest.mark.parametrize('cls, kwargs', [(CPMuMoE, dict(rank=5)),
                                         (TRMuMoE, dict(ranks=(2, 3, 4)))])
@pytest.mark.parametrize('gate_act', ['entmax15', 'softmax'])
def test_linear_form_equals_its_materialised_experts(cls, kwargs, gate_act):
    layer = cls(6, 7, num_experts=9, gate_act=gate_act, **kwargs).eval()
    with torch.no_grad():
        layer.gate_weight.normal_()  # non-uniform gates
    z = torch.randn(4, 3, 6)
    a = layer.gate_weights(z.reshape(-1, 6, 1, 1))[..., 0, 0]  # (T, N)
    torch.testing.assert_close(a.sum(1), torch.ones(12))
    z1 = torch.cat([z.reshape(-1, 6), torch.ones(12, 1)], 1)
    weight = layer.materialize()  # (N, I+1, O)
    expected = torch.einsum('tn,nio,ti->to', a, weight, z1).view(4, 3, 7)
    torch.testing.assert_close(layer(z), expected, atol=1e-5, rtol=1e-4)


def test_entmax_gates_are_sparse():
    layer = CPMuMoE(6, 7, num_experts=16, rank=4).eval()
    with torch.no_grad():
        layer.gate_weight.normal_(std=3)
    a = layer.gate_weights(torch.randn(10, 6, 1, 1))
    assert (a == 0).any() and torch.allclose(a.sum(1), torch.ones_like(a.sum(1)))


@pytest.mark.parametrize('cls, kwargs', [(CPMuMoEConv2d, dict(rank=5)),
                                         (TRMuMoEConv2d, dict(ranks=(2, 3, 2)))])
@pytest.mark.parametrize('geometry', [dict(kernel_size=3, padding=1),
                                      dict(kernel_size=3, stride=2, padding=2, dilation=2)])
def test_pixel_gated_conv_equals_its_materialised_experts(cls, kwargs, geometry):
    layer = cls(4, 5, num_experts=6, gate_mode='pixel', **geometry, **kwargs).eval()
    with torch.no_grad():
        layer.gate_weight.normal_()
    x = torch.randn(2, 4, 9, 9)
    a = layer.gate_weights(x)  # (B, N, H', W')
    weight, bias = layer.materialize()
    conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
    per_expert = torch.stack([F.conv2d(x, weight[n], bias[n], **conv) for n in range(6)], 1)
    expected = (a.unsqueeze(2) * per_expert).sum(1)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('cls', [CPMuMoEConv2d, TRMuMoEConv2d])
def test_image_gated_conv_is_a_mixed_kernel_conv(cls):
    layer = cls(4, 5, 3, padding=1, num_experts=8, gate_mode='image', bias=False,
                **({'rank': 6} if cls is CPMuMoEConv2d else {'ranks': (3, 2, 3)})).eval()
    with torch.no_grad():
        layer.gate_weight.normal_()
    x = torch.randn(3, 4, 6, 6)
    a = layer.gate_weights(x)
    weight, bias = layer.materialize()
    assert bias is None
    expected = torch.cat([F.conv2d(x[b:b + 1], torch.einsum('n,noikl->oikl', a[b], weight),
                                   padding=1) for b in range(3)])
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-4)


def test_rank_for_params_matches_a_dense_conv():
    rank = rank_for_params(256, 256, 256, kernel_size=3)
    layer = CPMuMoEConv2d(256, 256, 3, padding=1, num_experts=256, rank=rank, gate_mode='image')
    dense = 256 * 256 * 9
    assert abs(sum(p.numel() for p in layer.parameters()) - dense) / dense < 0.01
    # DESIGN §4 formula for linear layers
    assert rank_for_params(64, 64, 8) == round((64 * 64 - 64 * 8) / (8 + 64 + 1 + 64))
    r = rank_for_params(64, 64, 8, kind='tr')
    assert TRMuMoE(64, 64, 8).ranks == (r, r, r)
    with pytest.raises(ValueError, match='too few'):
        rank_for_params(4, 4, 64)


def test_bad_arguments():
    with pytest.raises(ValueError, match='same'):
        CPMuMoEConv2d(4, 4, 3, padding=0, rank=2, gate_mode='pixel')
    with pytest.raises(ValueError, match="'sparsemax'"):
        CPMuMoE(4, 4, 8, rank=2, gate_act='sparsemax')
    with pytest.raises(ValueError, match='ranks'):
        TRMuMoE(4, 4, 8, ranks=(2, 2))


@pytest.mark.parametrize('cls', [CPMuMoEConv2d, TRMuMoEConv2d])
def test_a_map_of_another_shape_is_refused_naming_the_layer(cls):
    layer = cls(4, 4, 3, padding=1, num_experts=4)
    layer.moe_name = 'neck.conv'
    with pytest.raises(ValueError, match=r'neck\.conv: expected \(B, 4, H, W\) input, got '
                       r'shape \(2, 4, 7\).*leave a conv fed other shapes dense'):
        layer(torch.randn(2, 4, 7))
