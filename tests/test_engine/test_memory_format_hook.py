"""MemoryFormatHook: the same detector on NHWC feature maps, refused where mmcv ops sit.

Every toy config either runs channels-last and then gives the contiguous model's
losses, gradients and head outputs, or (a model with mmcv's RoIAlign) stays
contiguous, which channels-last would have been refused for.
"""
import copy
import os.path as osp
from types import SimpleNamespace

import pytest
import torch

from helpers import (CONFIGS, TOY_CONFIGS, TOY_MOE_CONFIG, build_model, load_config,
                     one_training_step)
from mmdet_moe.engine.hooks import MemoryFormatHook

TOY_CONFIG_PARAMS = [pytest.param(path, id=osp.basename(path),
                                  marks=() if path == TOY_MOE_CONFIG else pytest.mark.slow)
                     for path in TOY_CONFIGS]
TOY_FASTER_RCNN = osp.join(CONFIGS, 'toy', 'faster-rcnn_r18_fpn_moe-roi-head_4e_toy-coco.py')


def convert(model, memory_format='channels_last'):
    MemoryFormatHook(memory_format).before_run(SimpleNamespace(model=model))


def head_outputs(model, data):
    model.eval()
    with torch.no_grad():
        outputs = model(data['inputs'], data['data_samples'], mode='tensor')
    return [t for t in torch.utils._pytree.tree_leaves(outputs) if torch.is_tensor(t)]


@pytest.mark.parametrize('path', TOY_CONFIG_PARAMS)
def test_toy_config_runs_channels_last_as_contiguous(path):
    cfg = load_config(path)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    if cfg.default_hooks.memory_format.memory_format == 'contiguous':
        with pytest.raises(ValueError, match=r'roi_head\.bbox_roi_extractor\.roi_layers\.0'):
            convert(model)
        return
    assert cfg.default_hooks.memory_format.memory_format == 'channels_last'
    reference = copy.deepcopy(model)
    params = list(model.parameters())
    convert(model)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]  # optimizer ok
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in params if p.dim() == 4)
    torch.manual_seed(1)  # gate noise, samplers
    expected, data = one_training_step(reference)
    torch.manual_seed(1)
    losses, _ = one_training_step(model)
    assert losses.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(losses[key], expected[key], rtol=1e-4, atol=1e-5,
                                   msg=f'{key} differs channels-last')
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5,
                                       msg=f'{name}.grad differs channels-last')
    outputs, expected_outputs = head_outputs(model, data), head_outputs(reference, data)
    with torch.no_grad():  # the first conv already returns NHWC memory
        assert model.backbone.conv1(data['inputs']).is_contiguous(
            memory_format=torch.channels_last)
    for got, want in zip(outputs, expected_outputs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    convert(model, 'contiguous')  # and back
    assert all(p.is_contiguous() for p in model.parameters())


def test_refuses_mmcv_ops_naming_them():
    from mmcv.ops import RoIAlign
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), RoIAlign(7, 1.))
    with pytest.raises(ValueError, match=r"mmcv compiled ops read NCHW.*\['1'\].*"
                                         r"memory_format='contiguous'"):
        convert(model)
    assert model[0].weight.is_contiguous()  # nothing converted
    convert(model, 'contiguous')  # NCHW is what they read


def test_bad_memory_format_names_the_choices():
    with pytest.raises(ValueError, match=r"memory_format='nhwc'; expected one of "
                                         r"\['channels_last', 'contiguous'\]"):
        MemoryFormatHook('nhwc')


@pytest.mark.parametrize('path, channels_last', [(TOY_MOE_CONFIG, True),
                                                 (TOY_FASTER_RCNN, False)])
def test_runner_applies_the_configs_format(path, channels_last, tmp_path):
    """Through the Runner, as `tools/train.py` builds it from the config."""
    from mmengine.runner import Runner
    cfg = load_config(path)
    cfg.work_dir = str(tmp_path)
    runner = Runner.from_cfg(cfg)
    runner.call_hook('before_run')
    assert runner.model.backbone.conv1.weight.is_contiguous(
        memory_format=torch.channels_last) == channels_last
