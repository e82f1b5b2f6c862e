"""ONNX export of every MoE layer type: onnxruntime matches eager, routing stays in
the graph (inputs routed unlike the example's), no data-dependent Python traced."""
import pytest
import torch
import torch.nn as nn

from mmdet_moe.layers import (CPMuMoEConv2d, MoE, MoEConv2d, TRMuMoEConv2d,
                              export_mode, export_onnx, export_plans, run_onnx)
from mmdet_moe.layers.base import MoEModuleMixin
from mmdet_moe.layers.export import ExportError

pytest.importorskip('onnxruntime')
C, SIZE = 8, 12


class Levels(nn.Module):
    """A MoE called with two levels (as a dense head calls it), outputs as a tuple."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        return tuple(self.moe([x, x[:, :, ::2, ::2]]))


def subnet():
    return nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.ReLU(), nn.Conv2d(C, 4, 1))


LAYERS = {
    'conv-fused-linear': lambda: MoEConv2d(C, 6, 3, padding=1, num_experts=4, top_k=2),
    'conv-dispatch-paper_conv': lambda: MoEConv2d(
        C, 6, 3, padding=1, num_experts=4, top_k=1, impl='dispatch',
        gate_cfg=dict(gate_type='paper_conv', conv_channels=8, renormalize=False)),
    'conv-dense-hard-paper_fc': lambda: MoEConv2d(
        C, 6, 3, padding=1, num_experts=4, top_k=2, impl='dense',
        gate_cfg=dict(type='RelativeImportanceGate', gate_type='paper_fc')),
    'conv-fused-equal': lambda: MoEConv2d(C, 6, 1, num_experts=3, top_k=3,
                                          gate_cfg=dict(type='EqualWeightGate')),
    'subnet-dispatch-conv-gate': lambda: Levels(MoE(
        expert_factory=subnet, num_experts=4, in_channels=C, top_k=2,
        gate_cfg=dict(gate_type='conv', conv_channels=8))),
    'convs-fused': lambda: Levels(MoE(expert_factory=lambda: nn.Conv2d(C, 5, 3, padding=1),
                                      num_experts=4, in_channels=C, top_k=2)),
    'cp-pixel-entmax-bn': lambda: CPMuMoEConv2d(C, 6, num_experts=16, rank=4),
    'tr-image-softmax-ln': lambda: TRMuMoEConv2d(C, 6, num_experts=8, ranks=(2, 3, 2),
                                                 gate_mode='image', gate_act='softmax',
                                                 norm='ln'),
}


def routed_experts(module, x):
    """Per image, the experts of every gated layer in ``module`` it is routed to."""
    with torch.no_grad():
        routed = [g(x).weights > 0 for g in (m.gate for m in module.modules()
                                             if hasattr(m, 'gate'))]
        return [tuple(tuple(r[b].tolist()) for r in routed) for b in range(len(x))]


def pick_differently_routed(module, gen):
    """Two images (1, C, H, W) that the module's gates route to different experts."""
    candidates = torch.randn(16, C, SIZE, SIZE, generator=gen) + \
        3 * torch.randn(16, C, 1, 1, generator=gen)
    routes = routed_experts(module, candidates)
    for j in range(1, len(candidates)):
        if routes[j] != routes[0]:
            return candidates[:1], candidates[j:j + 1]
    return None


def as_tuple(y):
    return y if isinstance(y, tuple) else (y,)


@pytest.mark.parametrize('kind', sorted(LAYERS))
def test_onnxruntime_matches_eager_on_inputs_routed_unlike_the_example(kind, tmp_path):
    torch.manual_seed(0)
    module = LAYERS[kind]().eval()
    with torch.no_grad():  # a spread of gate logits, so images route differently
        for name, p in module.named_parameters():
            if 'gate' in name and p.dim() > 1:
                p.normal_(0, 1)
    gen = torch.Generator().manual_seed(1)
    pair = pick_differently_routed(module, gen)
    soft = pair is None
    if soft:  # μMoE (soft, all experts) or equal weights: any two images
        assert not any(getattr(m, 'gate', None) is not None and
                       m.gate.top_k < m.gate.num_experts for m in module.modules())
        pair = torch.randn(1, C, SIZE, SIZE, generator=gen), \
            torch.randn(1, C, SIZE, SIZE, generator=gen)
    a, b = pair
    path = str(tmp_path / 'layer.onnx')
    impls = {id(m): m.impl for m in module.modules() if hasattr(m, 'impl')}
    example = torch.cat([a, a])  # both rows routed as image a
    with torch.no_grad():
        names = [f'y{i}' for i in range(len(as_tuple(module(example))))]
    export_onnx(module, (example,), path, input_names=['x'], output_names=names)
    assert {id(m): m.impl for m in module.modules() if hasattr(m, 'impl')} == impls
    for batch in (torch.cat([a, b]), torch.cat([b, a]), torch.cat([b, b])):
        with torch.no_grad():
            expected = as_tuple(module(batch))
        got = run_onnx(path, {'x': batch})
        for e, g in zip(expected, got, strict=True):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=0)


def test_plans_say_what_each_layer_computes_and_export_mode_restores_impl():
    moe = MoE(expert_factory=subnet, num_experts=4, in_channels=C, top_k=2)
    model = nn.ModuleDict(dict(fused=MoEConv2d(C, C, 3, padding=1),
                               roi=MoEConv2d(C, C, 3, padding=1, impl='dispatch'),
                               subnet=moe, mu=CPMuMoEConv2d(C, C, num_experts=8, rank=2)))
    plans = {p.name: p for p in export_plans(model)}
    assert [plans[n].impl for n in ('fused', 'roi', 'subnet', 'mu')] == \
        ['fused', 'fused', 'dense', 'soft']
    assert plans['subnet'].cost == ('all 4 experts on every row, weighted by the gate: '
                                    '4× one expert (eager dispatch: 2×)')
    assert plans['roi'].cost.endswith('≈ 1× one conv (eager dispatch: 2×)')
    with pytest.raises(RuntimeError):
        with export_mode(model):
            assert (moe.impl, model['roi'].impl, model['fused'].impl) == \
                ('dense', 'fused', 'fused')
            raise RuntimeError
    assert (moe.impl, model['roi'].impl, model['fused'].impl) == \
        ('dispatch', 'dispatch', 'auto')


def test_a_fused_layer_runs_one_conv_per_image_in_the_graph(tmp_path):
    """Not N: the graph of a MoEConv2d with 8 experts holds one Conv per image."""
    import onnx
    torch.manual_seed(0)
    layer = MoEConv2d(C, C, 3, padding=1, num_experts=8, top_k=2).eval()
    path = str(tmp_path / 'fused.onnx')
    export_onnx(layer, (torch.randn(2, C, SIZE, SIZE),), path, input_names=['x'],
                output_names=['y'])
    ops = [node.op_type for node in onnx.load(path).graph.node]
    assert ops.count('Conv') == 2 and 'TopK' in ops


class Unexportable(MoEModuleMixin, nn.Module):
    def __init__(self):
        super().__init__()
        self._init_moe(None)

    def forward(self, x):
        return x


def test_a_moe_layer_without_export_path_is_refused_by_name():
    model = nn.Sequential(MoEConv2d(C, C, 1), nn.Sequential(Unexportable()))
    with pytest.raises(ExportError, match=r"^1\.0 \(Unexportable\) has no graph export"):
        with export_mode(model):
            pass
    assert model[0].impl == 'auto'


def test_data_dependent_python_in_mmdet_moe_fails_the_export(tmp_path, monkeypatch):
    # the gate's eval-time finiteness check, as if it did not know it was traced
    monkeypatch.setattr(torch.jit, 'is_tracing', lambda: False)
    with pytest.raises(RuntimeError, match=r'mmdet_moe/layers/gates\.py:\d+: Converting a '
                       'tensor to a Python boolean'):
        export_onnx(MoE(expert_factory=subnet, num_experts=4, in_channels=C).eval(),
                    (torch.randn(1, C, 4, 4),), str(tmp_path / 'x.onnx'),
                    input_names=['x'], output_names=['y'])


def test_training_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match='eval mode'):
        export_onnx(MoEConv2d(C, C, 1), (torch.randn(1, C, 4, 4),),
                    str(tmp_path / 'x.onnx'), input_names=['x'], output_names=['y'])
