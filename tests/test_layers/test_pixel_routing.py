"""Per-location routing (``gate_mode='pixel'``): every output location picks its own k
experts. Proven against a location-by-location computation written here, against the
per-image gate (when all locations of a row carry the same features) and against the
dense conv (upcycled identical experts)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmdet_moe.layers import (CPMuMoEConv2d, MoE, MoEConv2d, RelativeImportanceGate, TopKGate,
                              TRMuMoEConv2d, dense_pixel_conv2d, export_onnx, pixel_map,
                              prune_experts, record_gates, routed_pixel_conv2d, routes_pixels,
                              run_onnx)

PIXEL = dict(gate_mode='pixel')


def location_by_location(x, gates, weight, bias, stride, padding, dilation):
    """y[b, :, i, j] = Σ_n gates[b, n, i, j] · (W_n ∗ x_b + b_n)[:, i, j], one location
    at a time: each output location's window cut out and multiplied by hand."""
    batch, _, out_h, out_w = gates.shape
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    kh, kw = weight.shape[-2:]
    out = torch.zeros(batch, weight.shape[1], out_h, out_w, dtype=x.dtype)
    for b in range(batch):
        for i in range(out_h):
            for j in range(out_w):
                top, left = i * stride[0], j * stride[1]
                window = padded[b, :, top:top + dilation[0] * (kh - 1) + 1:dilation[0],
                                left:left + dilation[1] * (kw - 1) + 1:dilation[1]]
                for n in range(weight.shape[0]):
                    g = gates[b, n, i, j]
                    if g != 0:
                        y = (weight[n] * window).sum(dim=(1, 2, 3))
                        out[b, :, i, j] += g * (y + (0 if bias is None else bias[n]))
    return out


def random_routing(rows, num_experts, top_k, gen):
    top, indices = torch.randn(rows, num_experts, generator=gen).topk(top_k, dim=1)
    return torch.zeros(rows, num_experts).scatter(1, indices, top.softmax(1)), indices


@pytest.mark.parametrize('stride,padding,dilation,bias', [
    ((1, 1), (1, 1), (1, 1), True), ((2, 2), (1, 1), (1, 1), False),
    ((1, 2), (2, 2), (2, 2), True)])
def test_routed_and_dense_equal_the_location_by_location_mix(stride, padding, dilation, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(4, 3, 5, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(4, 3, generator=gen, dtype=torch.float64) if bias else None
    out_h = (7 + 2 * padding[0] - dilation[0] * 2 - 1) // stride[0] + 1
    out_w = (6 + 2 * padding[1] - dilation[1] * 2 - 1) // stride[1] + 1
    weights, indices = random_routing(2 * out_h * out_w, 4, 2, gen)
    weights = weights.double()
    gate_map = pixel_map(weights, (2, 0, out_h, out_w))
    expected = location_by_location(x, gate_map, weight, b, stride, padding, dilation)
    routed = routed_pixel_conv2d(x, weights, indices, weight, b, stride, padding, dilation)
    dense = dense_pixel_conv2d(x, gate_map, weight, b, stride, padding, dilation)
    torch.testing.assert_close(routed, expected)
    torch.testing.assert_close(dense, expected)


def test_routed_gradients_equal_the_dense_mix():
    gen = torch.Generator().manual_seed(1)
    weights, indices = random_routing(2 * 6 * 6, 4, 2, gen)
    grads = []
    for run in ('routed', 'dense'):
        x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(2),
                        dtype=torch.float64, requires_grad=True)
        weight = torch.randn(4, 3, 4, 3, 3, generator=torch.Generator().manual_seed(3),
                             dtype=torch.float64, requires_grad=True)
        g = weights.double().requires_grad_()
        if run == 'routed':
            y = routed_pixel_conv2d(x, g, indices, weight, None, (1, 1), (1, 1), (1, 1))
        else:
            y = dense_pixel_conv2d(x, pixel_map(g, x.shape), weight, None, 1, 1)
        (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y).cos()).sum().backward()
        grads.append((x.grad, weight.grad, g.grad.gather(1, indices)))
    for routed, dense in zip(*grads):
        torch.testing.assert_close(routed, dense)


@pytest.mark.parametrize('impl', ['dispatch', 'dense', 'auto'])
@pytest.mark.parametrize('gate_type', ['linear', 'conv', 'paper_fc', 'paper_simple'])
def test_pixel_gate_equals_the_image_gate_on_spatially_constant_input(impl, gate_type):
    """A map whose every location holds the same vector: each location's logits are the
    image's (the conv gate's padding aside: it is avoided by a 1×1-padded map)."""
    torch.manual_seed(0)
    image = MoEConv2d(6, 5, 3, padding=1, num_experts=4, top_k=2, impl='dense',
                      gate_cfg=dict(gate_type=gate_type, noisy=False)).eval()
    pixel = MoEConv2d(6, 5, 3, padding=1, num_experts=4, top_k=2, impl=impl,
                      gate_cfg=dict(gate_type=gate_type, noisy=False, **PIXEL)).eval()
    pixel.load_state_dict(image.state_dict())
    x = torch.randn(3, 6, 1, 1).expand(3, 6, 5, 5).contiguous()
    if gate_type == 'conv':  # the conv gate sees its own zero padding at the border
        with torch.no_grad():
            image.gate.conv.weight.zero_()
            image.gate.conv.weight[:, :, 1, 1].normal_()
            pixel.gate.conv.weight.copy_(image.gate.conv.weight)
    torch.testing.assert_close(pixel(x), image(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('impl', ['dispatch', 'dense'])
def test_upcycled_identical_experts_equal_the_dense_conv(impl):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1)
    moe = MoEConv2d.from_dense(conv, num_experts=4, top_k=2, impl=impl,
                               gate_cfg=PIXEL).eval()
    with torch.no_grad():
        moe.gate.w_gate.weight.normal_(0, 3)  # locations route differently
    x = torch.randn(2, 6, 9, 8)
    torch.testing.assert_close(moe(x), conv(x), atol=1e-5, rtol=1e-5)
    assert len({tuple(r) for r in moe.gate(x[..., ::2, ::2]).indices.tolist()}) > 1


def subnet():
    return nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 1))


@pytest.mark.parametrize('experts', ['subnet', 'convs'])
def test_moe_container_mixes_per_location_on_every_level(experts):
    torch.manual_seed(0)
    factory = subnet if experts == 'subnet' else (lambda: nn.Conv2d(6, 3, 3, padding=1))
    moe = MoE(expert_factory=factory, num_experts=4, in_channels=6, top_k=2,
              gate_cfg=dict(noisy=False, **PIXEL)).eval()
    levels = [torch.randn(2, 6, 6, 6), torch.randn(2, 6, 3, 3)]
    with record_gates(moe) as recorder:
        outs = moe(levels)
    for level, out, record in zip(levels, outs, recorder.records, strict=True):
        gate_map = record.pixel_weights
        assert gate_map.shape == (2, 4, *level.shape[-2:]) and record.level is not None
        expected = sum(gate_map[:, n, None] * moe.experts[n](level) for n in range(4))
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        assert ((gate_map > 0).sum(1) == 2).all()  # k experts at every location


def test_upcycled_subnet_moe_equals_the_dense_subnet():
    torch.manual_seed(0)
    dense = subnet()
    moe = MoE.from_dense(dense, num_experts=4, top_k=2, in_channels=6,
                         gate_cfg=PIXEL).eval()
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(moe(x), dense(x), atol=1e-5, rtol=1e-5)


def test_balance_losses_and_hard_constraints_count_locations():
    torch.manual_seed(0)
    layer = MoEConv2d(4, 4, 3, padding=1, num_experts=4, top_k=2,
                      gate_cfg=dict(noisy=False, **PIXEL), balance_cfg=dict(importance=1.0),
                      impl='dense').train()
    x = torch.randn(2, 4, 3, 5)
    layer(x)
    rows = layer._gate_outputs[0].weights
    assert rows.shape == (2 * 3 * 5, 4)
    importance = rows.sum(0)
    expected = importance.var() / importance.mean() ** 2
    torch.testing.assert_close(layer.aux_losses()['importance'], expected)
    gate = RelativeImportanceGate(4, 4, 2, gate_mode='pixel').train()
    weights = gate(x).weights
    fair = weights.shape[0] / 4
    torch.testing.assert_close(gate.usage, (weights.sum(0) - fair) / fair)


def test_recorded_maps_are_the_routing_and_their_means_the_rows():
    layer = MoEConv2d(4, 4, 3, stride=2, padding=1, num_experts=3, top_k=2,
                      gate_cfg=PIXEL).eval()
    x = torch.randn(2, 4, 7, 7)
    with record_gates(layer) as recorder:
        layer(x)
    (record,) = recorder.records
    expected = pixel_map(layer.gate(x[..., ::2, ::2]).weights, (2, 3, 4, 4))
    torch.testing.assert_close(record.pixel_weights, expected)
    torch.testing.assert_close(record.weights, expected.mean(dim=(2, 3)))


def test_pruning_unrouted_experts_keeps_the_output():
    torch.manual_seed(0)
    layer = MoEConv2d(4, 4, 3, padding=1, num_experts=4, top_k=2, gate_cfg=PIXEL).eval()
    with torch.no_grad():
        layer.gate.w_gate.bias.copy_(torch.tensor([0., 0., -1e4, 0.]))  # 2 never routed
    x = torch.randn(2, 4, 5, 5)
    before = layer(x)
    prune_experts(layer, [0, 1, 3])
    torch.testing.assert_close(layer(x), before)


def test_onnx_export_keeps_the_per_location_routing(tmp_path):
    pytest.importorskip('onnxruntime')
    torch.manual_seed(0)
    layer = MoEConv2d(4, 5, 3, padding=1, num_experts=4, top_k=2, impl='dispatch',
                      gate_cfg=PIXEL).eval()
    with torch.no_grad():
        layer.gate.w_gate.weight.normal_(0, 3)
    path = str(tmp_path / 'pixel.onnx')
    export_onnx(layer, (torch.randn(2, 4, 6, 6),), path, input_names=['x'],
                output_names=['y'])
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        expected = layer(x)
    torch.testing.assert_close(run_onnx(path, {'x': x})[0], expected, atol=1e-4, rtol=0)
    assert layer.impl == 'dispatch'


@pytest.mark.parametrize('kwargs,match', [
    (dict(padding=0), 'same" padding'),
    (dict(padding=1, impl='fused'), "impl='fused'"),
    (dict(padding=1, impl='dispatch', capacity_factor=1.0), 'capacity_factor'),
    (dict(padding=1, gate_cfg=dict(gate_type='paper_conv', **PIXEL)), 'paper_conv'),
    (dict(padding=1, gate_cfg=dict(gate_mode='pixels')), 'gate_mode'),
])
def test_bad_pixel_routing_is_refused_at_build(kwargs, match):
    kwargs.setdefault('gate_cfg', PIXEL)
    with pytest.raises(ValueError, match=match):
        MoEConv2d(4, 4, 3, num_experts=4, top_k=2, **kwargs)


def test_pixel_gate_on_a_vector_names_the_shape():
    gate = TopKGate(4, 4, 2, gate_mode='pixel')
    with pytest.raises(ValueError, match=r"gate_mode='pixel'.*\(2, 4\)"):
        gate(torch.randn(2, 4))


def test_subnet_experts_that_change_the_map_size_are_named():
    moe = MoE(expert_factory=lambda: nn.Conv2d(4, 4, 3), num_experts=2, in_channels=4,
              top_k=1, gate_cfg=dict(renormalize=False, **PIXEL))
    with pytest.raises(ValueError, match='keep the size'):
        moe(torch.randn(1, 4, 6, 6))


def test_routed_conv_with_more_kernel_than_patch_data_equals_the_location_mix():
    """Few locations, many wide experts (more kernel than patch data)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 5, 2, 3, generator=gen, dtype=torch.float64)
    weight = torch.randn(6, 16, 5, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(6, 16, generator=gen, dtype=torch.float64)
    weights, indices = random_routing(6, 6, 2, gen)
    weights = weights.double()
    expected = location_by_location(x, pixel_map(weights, (1, 0, 2, 3)), weight, bias,
                                    (1, 1), (1, 1), (1, 1))
    torch.testing.assert_close(
        routed_pixel_conv2d(x, weights, indices, weight, bias, (1, 1), (1, 1), (1, 1)),
        expected)


@pytest.mark.parametrize('make', [
    lambda: MoEConv2d(4, 6, 3, padding=1, gate_cfg=dict(gate_mode='pixel'), impl='dispatch'),
    lambda: MoEConv2d(4, 6, 3, padding=1, gate_cfg=dict(gate_mode='pixel'), impl='dense'),
    lambda: CPMuMoEConv2d(4, 6, 3, padding=1, num_experts=8, gate_mode='pixel'),
    lambda: TRMuMoEConv2d(4, 6, 3, padding=1, num_experts=8, gate_mode='pixel'),
])
def test_per_location_layers_return_contiguous_maps(make):
    """As a dense conv does: mmdet's heads ``view`` their outputs (CenterNet's
    heatmap decode crashed on a channels-last result)."""
    y = make().eval()(torch.randn(2, 4, 5, 5))
    assert y.is_contiguous()
    y.view(2, -1)


@pytest.mark.parametrize('mode', ['image', 'pixel'])
def test_routes_pixels_reads_a_gate_a_moe_layer_or_a_mumoe_layer(mode):
    gate = TopKGate(8, 4, 2, gate_mode=mode)
    layers = [gate, MoEConv2d(8, 8, 3, padding=1, num_experts=4, top_k=2,
                              gate_cfg=dict(type='TopKGate', gate_mode=mode)),
              CPMuMoEConv2d(8, 8, 3, padding=1, num_experts=4, gate_mode=mode)]
    assert [routes_pixels(m) for m in layers] == [mode == 'pixel'] * 3
    assert not routes_pixels(nn.Conv2d(8, 8, 3)) and not routes_pixels(None)
