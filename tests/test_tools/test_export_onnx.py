"""tools/export_onnx.py: every provided MoE config exports, onnxruntime matches eager,
per-image routing stays in the graph; bad input exits 2 writing nothing."""
import os
import os.path as osp

import pytest
import torch

from helpers import (COCO_MOE_CONFIGS, TOY_MOE_CONFIG, TOY_MOE_CONFIGS, build_model, load_config,
                     redraw_parameters, run_tool, with_resnet18)
from mmdet_moe.layers import export_onnx, record_gates, run_onnx
from mmdet_moe.models.export import TensorForward, roi_features

pytestmark = pytest.mark.slow

pytest.importorskip('onnxruntime')

WIDTH = 32  # FPN and head channels of the shrunk COCO configs
MOE_CONFIGS = COCO_MOE_CONFIGS + TOY_MOE_CONFIGS


def small_model(path):
    """The config's model; a COCO one with ResNet-18 and 32-channel FPN and heads."""
    model = load_config(path).model
    if 'toy' in path:
        return model
    model = with_resnet18(model)
    model.neck.out_channels = WIDTH
    if 'bbox_head' in model:
        model.bbox_head.update(in_channels=WIDTH, feat_channels=WIDTH)
    else:
        model.rpn_head.update(in_channels=WIDTH, feat_channels=WIDTH)
        model.roi_head.bbox_roi_extractor.out_channels = WIDTH
        model.roi_head.bbox_head.update(in_channels=WIDTH, conv_out_channels=WIDTH,
                                        fc_out_channels=64)
    return model


def example(forward, batch=2, size=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=gen)
    if not forward.two_stage:
        return (images,)
    # RoIs of at least a feature pixel at their level (smaller ones: see docs/prune_merge_export.md)
    wh = 12 + 36 * torch.rand(7, 2, generator=gen)
    xy = (size - wh) * torch.rand(7, 2, generator=gen)
    index = torch.arange(7.)[:, None] % batch
    return images, torch.cat([index, xy, xy + wh], 1)


def max_diffs(forward, path, inputs):
    with torch.no_grad():
        eager = forward(*inputs)
    got = run_onnx(path, dict(zip(forward.input_names, inputs, strict=True)))
    return {n: (e - g).abs().max().item()
            for n, e, g in zip(forward.output_names, eager, got, strict=True)}


@pytest.mark.parametrize('config', MOE_CONFIGS, ids=osp.basename)
def test_every_provided_moe_config_exports_and_matches_eager(config, tmp_path):
    torch.manual_seed(0)
    model = build_model(small_model(config)).eval()
    redraw_parameters(model)
    with torch.no_grad():  # box scales 1 (not 3): FCOS's exp(scale · x) stays near 1
        for p in model.parameters():
            if p.dim() == 0:
                p.fill_(1.0)
    forward = TensorForward(model).eval()
    inputs = example(forward)
    names = forward.name_outputs(*inputs)
    path = str(tmp_path / 'model.onnx')
    export_onnx(forward, inputs, path, input_names=forward.input_names, output_names=names,
                dynamic_axes={'rois': {0: 'n'}} if forward.two_stage else None,
                dynamic_rows=forward.dynamic_rows)
    new = example(forward, seed=1)  # other images (and another number of RoIs)
    if forward.two_stage:
        new = new[0], new[1][:5]
    diffs = max_diffs(forward, path, new)
    assert max(diffs.values()) <= 1e-4, diffs
    if forward.two_stage:  # the graph's RoI pooling is mmdet's
        feats = model.extract_feat(new[0])
        with torch.no_grad():
            torch.testing.assert_close(
                roi_features(model.roi_head.bbox_roi_extractor, feats, new[1]),
                model.roi_head.bbox_roi_extractor(feats[:4], new[1]), atol=1e-6, rtol=0)


def routing(model, images):
    """Per image, the experts chosen by every gate call (all FPN levels)."""
    with record_gates(model) as recorder, torch.no_grad():
        model._forward(images)
    return [tuple(tuple((r.weights[b] > 0).tolist()) for r in recorder.records)
            for b in range(len(images))]


def test_routing_stays_dynamic_in_the_graph(tmp_path):
    """Exported with an example whose two images route alike, the graph routes other
    images as eager does, also where they take other experts."""
    torch.manual_seed(0)
    model = build_model(load_config(TOY_MOE_CONFIG).model).eval()
    redraw_parameters(model)
    with torch.no_grad():  # gate logits spread wide: images route differently
        model.bbox_head.cls_moe.gate.w_gate.weight.mul_(30)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 64, 64, generator=gen) + torch.randn(8, 3, 1, 1, generator=gen)
    routes = routing(model, images)
    other = next(i for i in range(1, 8) if routes[i] != routes[0])
    a, b = images[:1], images[other:other + 1]
    forward = TensorForward(model).eval()
    path = str(tmp_path / 'model.onnx')
    export_onnx(forward, (torch.cat([a, a]),), path, input_names=forward.input_names,
                output_names=forward.name_outputs(torch.cat([a, a])))
    for batch in (torch.cat([a, b]), torch.cat([b, a]), torch.cat([b, b])):
        diffs = max_diffs(forward, path, (batch,))
        assert max(diffs.values()) <= 1e-4, diffs


@pytest.fixture(scope='module')
def toy_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('export') / 'toy_moe.pth')
    torch.save({'state_dict': build_model(load_config(TOY_MOE_CONFIG).model).state_dict()},
               path)
    return path


def test_cli_exports_prints_the_cost_per_layer_and_verifies(toy_checkpoint, tmp_path):
    out = tmp_path / 'onnx' / 'toy.onnx'
    proc = run_tool('export_onnx.py', TOY_MOE_CONFIG, toy_checkpoint, '--out', out,
                    '--shape', 64, 64, '--batch', 2, '--verify')
    assert proc.returncode == 0, proc.output
    assert out.is_file() and os.listdir(out.parent) == ['toy.onnx']
    assert ('bbox_head.cls_moe (TowerMoE): all 4 experts on every row, weighted by the gate: '
            '4× one expert (eager dispatch: 2×)') in proc.stdout
    assert 'images 2×3×64×64' in proc.stdout
    diff = float(proc.stdout.split('max abs diff ')[1].split()[0])
    assert diff <= 1e-4


def test_cli_refuses_a_mismatching_checkpoint_writing_nothing(toy_checkpoint, tmp_path):
    state = torch.load(toy_checkpoint)['state_dict']
    state['neck.extra.weight'] = state.pop('bbox_head.cls_moe.gate.w_gate.weight')
    bad = tmp_path / 'bad.pth'
    torch.save({'state_dict': state}, bad)
    out = tmp_path / 'onnx' / 'toy.onnx'
    proc = run_tool('export_onnx.py', TOY_MOE_CONFIG, bad, '--out', out)
    assert proc.returncode == 2, proc.output
    assert 'export_onnx: error: the checkpoint' in proc.stderr
    assert 'bbox_head.cls_moe.gate.w_gate.weight' in proc.stderr
    assert 'neck.extra.weight' in proc.stderr
    assert not out.parent.exists() or not os.listdir(out.parent)


FAKE_MOE = '''
import torch.nn as nn
from mmdet.models.necks import FPN
from mmdet.registry import MODELS
from mmdet_moe.layers.base import MoEModuleMixin


class NoExportMoE(MoEModuleMixin, nn.Identity):
    """A MoE layer type without a graph export path."""


@MODELS.register_module()
class NoExportMoEFPN(FPN):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.routed = NoExportMoE()
'''


def test_cli_refuses_a_moe_layer_without_export_path(toy_checkpoint, tmp_path,
                                                     monkeypatch):
    (tmp_path / 'fake_moe.py').write_text(FAKE_MOE)
    config = tmp_path / 'fake.py'
    config.write_text(f'_base_ = {TOY_MOE_CONFIG!r}\n'
                      "custom_imports = dict(imports=['mmdet_moe', 'fake_moe'])\n"
                      "model = dict(neck=dict(type='NoExportMoEFPN'))\n")
    monkeypatch.setenv('PYTHONPATH', str(tmp_path))
    out = tmp_path / 'out' / 'toy.onnx'
    proc = run_tool('export_onnx.py', config, toy_checkpoint, '--out', out)
    assert proc.returncode == 2, proc.output
    assert ('export_onnx: error: neck.routed (NoExportMoE) has no graph export path'
            in proc.stderr)
    assert not out.parent.exists()
