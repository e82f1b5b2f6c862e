"""Automatic mixed precision: the MoE path under CPU bfloat16 autocast.

Gate logits, noise, softmax / entmax and balance losses run in float32 (autocast off);
the experts run in the activation dtype and their outputs are mixed with the float32
gate weights cast to it, so a MoE layer returns what a dense layer at its place
returns under autocast (bfloat16 for a conv) and dispatch never adds bfloat16 rows
into float32 ones. Every toy MoE variant (whole-subnet and single-conv experts, MoE
FPN, μMoE, soft and hard constraints, FCOS and the Faster R-CNN RoI head) runs
training steps as AMP does: forward and loss under autocast, backward outside.

mmcv's CPU kernels of NMS and RoIAlign have no bfloat16 version (the dense stock
detectors fail there too, ``expected scalar type Float but found BFloat16``); the
``mmcv_float_ops`` fixture runs those two in float32, as their CUDA kernels accept
half precision.
"""
import copy
import os.path as osp
import sys

import pytest
import torch
import torch.nn as nn
from mmengine.config import ConfigDict

from helpers import TOY_MOE_CONFIGS, build_model, load_config, toy_retinanet
from mmdet_moe.layers import (CPMuMoEConv2d, EqualWeightGate, MoE, MoEConv2d,
                              TopKGate, TRMuMoEConv2d, is_moe_module, record_gates)
from mmdet_moe.layers.gate_output import GateOutput

AMP_DTYPE = torch.bfloat16
SOFT = dict(num_experts=4, top_k=2, gate_cfg=dict(type='TopKGate', noisy=True),
            balance_cfg=dict(importance=0.5, load=0.5, kl_uniform=0.5, switch=0.01, z=1e-3))
HARD = dict(num_experts=4, top_k=2,
            gate_cfg=dict(type='RelativeImportanceGate', threshold=0.3), balance_cfg=None)


def moe_fpn(moe):
    model = toy_retinanet()
    model.neck.update(type='MoEFPN', moe_parts=('lateral', 'output'), **moe)
    return model


def in_detector(*moe_layers):
    return ConfigDict(type='MoEDetector', detector=toy_retinanet(),
                      moe_layers=list(moe_layers))


VARIANTS = {
    **{osp.basename(path): (lambda p=path: load_config(p).model)
       for path in TOY_MOE_CONFIGS},
    'retina-conv-soft': lambda: toy_retinanet(moe_branches='both', expert_type='conv',
                                              moe_convs=(0,), **SOFT),
    'retina-conv-hard': lambda: toy_retinanet(moe_branches='both', expert_type='conv',
                                              moe_convs=(0,), **HARD),
    'retina-subnet-both-soft': lambda: toy_retinanet(moe_branches='both',
                                                     expert_type='subnet', **SOFT),
    'moe-fpn-soft': lambda: moe_fpn(SOFT),
    'moe-fpn-hard': lambda: moe_fpn(HARD),
    'tower-subnet-dispatch': lambda: in_detector(dict(
        paths='bbox_head.reg_convs', expert='subnet', output='retina_reg', **SOFT)),
    'mumoe-cp-pixel-tr-image': lambda: in_detector(
        dict(paths='bbox_head.cls_convs.0.conv', type='CPMuMoEConv2d', num_experts=16,
             gate_mode='pixel'),
        dict(paths='bbox_head.reg_convs.0.conv', type='TRMuMoEConv2d', num_experts=16,
             gate_mode='image', gate_act='softmax', norm='ln')),
}


@pytest.fixture
def mmcv_float_ops(monkeypatch):
    """NMS and RoIAlign of mmcv in float32 (their CPU kernels lack bfloat16)."""
    import mmcv.ops  # noqa: F401  (loads the submodules)
    from mmcv.ops.roi_align import RoIAlign
    nms_module = sys.modules['mmcv.ops.nms']
    ext = nms_module.ext_module

    class FloatNMS:
        def __getattr__(self, name):
            return getattr(ext, name)

        def nms(self, boxes, scores, *args, **kwargs):
            return ext.nms(boxes.float(), scores.float(), *args, **kwargs)

    roi_align = RoIAlign.forward

    def float_roi_align(self, feats, rois):
        with torch.autocast('cpu', enabled=False):
            return roi_align(self, feats.float(), rois.float()).to(feats.dtype)

    monkeypatch.setattr(nms_module, 'ext_module', FloatNMS())
    monkeypatch.setattr(RoIAlign, 'forward', float_roi_align)


def tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors(v)]
    return []


class DtypeProbe:
    """Forward hooks on every gate and MoE layer, noting the dtypes they return."""

    def __init__(self, model):
        self.gate_outputs, self.moe_outputs, self.handles = [], [], []
        for name, module in model.named_modules():
            if isinstance(module, (TopKGate, EqualWeightGate)):
                self.handles.append(module.register_forward_hook(self._gate(name)))
            if is_moe_module(module):
                self.handles.append(module.register_forward_hook(self._moe(name)))

    def _gate(self, name):
        def hook(module, args, output):
            assert isinstance(output, GateOutput)
            self.gate_outputs.append((name, output))
        return hook

    def _moe(self, name):
        def hook(module, args, output):
            self.moe_outputs.append((name, [t.dtype for t in tensors(args)],
                                     [t.dtype for t in tensors(output)]))
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def total_loss(losses):
    return sum(sum(v) if isinstance(v, list) else v
               for k, v in losses.items() if 'loss' in k)


def check_precision(probe, records):
    assert probe.moe_outputs, 'no MoE layer ran'
    for name, inputs, outputs in probe.moe_outputs:
        # a dense conv here returns the autocast dtype: so must the MoE layer
        assert inputs and set(inputs) <= {AMP_DTYPE, torch.float32}, (name, inputs)
        assert outputs and set(outputs) == {AMP_DTYPE}, (name, outputs)
    for name, out in probe.gate_outputs:
        for field in ('weights', 'logits', 'noisy_logits', 'noise_std'):
            value = getattr(out, field)
            assert value is None or value.dtype == torch.float32, (name, field, value.dtype)
    assert records, 'no gate weights were recorded'
    for record in records:
        assert record.weights.dtype == torch.float32, (record.name, record.weights.dtype)
        if record.pixel_weights is not None:
            assert record.pixel_weights.dtype == torch.float32, record.name


@pytest.mark.slow
@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_training_steps_under_bf16_autocast(variant, mmcv_float_ops):
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(0)
    model = build_model(VARIANTS[variant]())
    packed = demo_mm_inputs(2, [[3, 64, 80]] * 2, num_items=[3] * 2, num_classes=5)
    data = model.data_preprocessor(packed, True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    for step in range(2):
        optimizer.zero_grad()
        probe = DtypeProbe(model)
        with record_gates(model) as recorder, torch.autocast('cpu', dtype=AMP_DTYPE):
            losses = model(**data, mode='loss')
            loss = total_loss(losses)
        probe.remove()
        loss.backward()  # outside autocast, as AMP does
        for key, value in losses.items():
            for t in tensors(value):
                assert torch.isfinite(t).all(), (variant, step, key)
                if key.startswith('loss_moe_'):
                    assert t.dtype == torch.float32, (key, t.dtype)
        check_precision(probe, recorder.records)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads
        bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
        assert not bad, f'non-finite gradients in {bad}'
        gate_params = [n for n, p in model.named_parameters()
                       if '.gate.' in n or n.endswith('gate_weight')]
        # the float32 gates get their gradient through the bfloat16 experts
        assert all(n in grads for n in gate_params), \
            [n for n in gate_params if n not in grads]
        assert gate_params or 'equal' in variant
        optimizer.step()
    if variant.endswith('-soft'):  # every balance loss, in float32
        assert {f'loss_moe_{n}' for n in SOFT['balance_cfg']} <= set(losses)


@pytest.mark.slow
def test_predict_under_bf16_autocast(mmcv_float_ops):
    """Eval: predictions of a MoE RetinaNet, tagged with float32 gate weights."""
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(0)
    model = build_model(toy_retinanet(moe_branches='cls', expert_type='subnet', **SOFT))
    packed = demo_mm_inputs(2, [[3, 64, 80]] * 2, num_items=[3] * 2, num_classes=5)
    data = model.data_preprocessor(packed, False)
    model.eval()
    probe = DtypeProbe(model)
    with torch.no_grad(), record_gates(model) as recorder, \
            torch.autocast('cpu', dtype=AMP_DTYPE):
        results = model(**copy.deepcopy(data), mode='predict')
    probe.remove()
    check_precision(probe, recorder.records)
    assert sum(len(r.pred_instances) for r in results) > 0
    for result in results:
        pred = result.pred_instances
        assert torch.isfinite(pred.bboxes.float()).all()
        assert torch.isfinite(pred.scores.float()).all()
        assert pred.expert_weights.dtype == torch.float32
        torch.testing.assert_close(pred.expert_weights.sum(-1),
                                   torch.ones(pred.expert_weights.shape[:-1]))


# ---- layers: the same dtypes as a dense conv, routing as in float32 ----------------

def conv_moe(impl, gate_cfg):
    return MoEConv2d(8, 8, 3, padding=1, num_experts=4, top_k=2, impl=impl,
                     gate_cfg=gate_cfg, balance_cfg=dict(importance=0.5, kl_uniform=0.5))


def subnet_moe(impl, gate_cfg):
    def expert():
        return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1))
    return MoE(expert_factory=expert, num_experts=4, in_channels=8, top_k=2, impl=impl,
               gate_cfg=gate_cfg, balance_cfg=dict(importance=0.5, switch=0.5))


NOISELESS = dict(type='TopKGate', noisy=False)
LAYERS = {
    **{f'conv-{impl}': (lambda i=impl: conv_moe(i, NOISELESS))
       for impl in ('fused', 'dispatch', 'dense')},
    **{f'subnet-{impl}': (lambda i=impl: subnet_moe(i, NOISELESS))
       for impl in ('dispatch', 'dense')},
    'conv-hard': lambda: conv_moe('dispatch', dict(type='RelativeImportanceGate')),
    'conv-paper_fc-gate': lambda: conv_moe('fused', dict(NOISELESS, gate_type='paper_fc')),
    'subnet-equal-weights': lambda: MoE(
        expert_factory=lambda: nn.Conv2d(8, 8, 3, padding=1), num_experts=3, in_channels=8,
        top_k=3, impl='dispatch', gate_cfg=dict(type='EqualWeightGate')),
    'cp-mumoe-pixel': lambda: CPMuMoEConv2d(8, 8, 3, num_experts=16, gate_mode='pixel'),
    **{f'conv-per-location-{impl}': (lambda i=impl: conv_moe(i, dict(NOISELESS,
                                                                   gate_mode='pixel')))
       for impl in ('dispatch', 'dense')},
    'subnet-per-location': lambda: subnet_moe('dispatch', dict(NOISELESS, gate_mode='pixel')),
    'tr-mumoe-image': lambda: TRMuMoEConv2d(8, 8, 3, num_experts=16, gate_mode='image',
                                            gate_act='softmax', norm='ln'),
}


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_layer_under_bf16_autocast(name):
    torch.manual_seed(0)
    layer = LAYERS[name]().train()
    fp32_layer = copy.deepcopy(layer)
    x = torch.randn(4, 8, 6, 7, requires_grad=True)
    with record_gates(layer) as recorder:
        with torch.autocast('cpu', dtype=AMP_DTYPE):
            y = layer(x)
            dense = nn.Conv2d(8, 8, 3, padding=1)(x)
            aux = layer.aux_losses()
    with record_gates(fp32_layer) as fp32_recorder:
        reference = fp32_layer(x)  # float32, no autocast
    assert y.dtype == dense.dtype == AMP_DTYPE
    (amp_rows,), (fp32_rows,) = ([r.weights for r in rec.records]
                                 for rec in (recorder, fp32_recorder))
    # routing is computed in float32 from the same float32 input: unchanged by AMP
    assert amp_rows.dtype == torch.float32
    torch.testing.assert_close(amp_rows, fp32_rows, rtol=0, atol=0)
    torch.testing.assert_close(y.float(), reference, rtol=0.05, atol=0.05)
    for value in aux.values():
        assert value.dtype == torch.float32 and torch.isfinite(value)
    (y.float().square().mean() + sum(aux.values(), torch.zeros(()))).backward()
    assert torch.isfinite(x.grad).all()
    for n, p in layer.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n
