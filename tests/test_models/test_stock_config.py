"""Configs after pruning (MoEDetector(expert_counts=...)) and merging (stock mmdet)."""
import os.path as osp

import pytest
import torch

from helpers import (COCO_MOE_CONFIGS, TOY_BASE_CONFIG, TOY_MOE_CONFIGS, build_model,
                     load_config, toy_retinanet, with_resnet18)
from mmdet_moe.layers import MoEConv2d, is_moe_module, prune_model_experts
from mmdet_moe.models.stock_config import pruned_config, stock_config

MOE_CONFIGS = COCO_MOE_CONFIGS + TOY_MOE_CONFIGS


@pytest.mark.slow
@pytest.mark.parametrize('path', MOE_CONFIGS, ids=osp.basename)
def test_stock_config_holds_the_merged_model_or_refuses(path):
    """Every MoEConv2d-only config becomes a stock one whose model has the MoE model's
    keys without the gates, each expert tensor's shape without its expert axis; any
    other MoE config is refused, naming what cannot be expressed."""
    cfg = load_config(path)
    if 'backbone' in cfg.model or 'detector' in cfg.model:
        with_resnet18(cfg.model)
    moe = build_model(cfg.model)
    layers = {n: m for n, m in moe.named_modules() if is_moe_module(m)}
    if not all(isinstance(m, MoEConv2d) for m in layers.values()):
        with pytest.raises(ValueError, match='no stock form|not single MoEConv2d|μMoE'):
            stock_config(cfg)
        return
    dense_cfg = stock_config(cfg)
    text = dense_cfg.pretty_text
    assert 'mmdet_moe' not in text and 'MoE' not in text
    assert 'MemoryFormatHook' not in text  # the toy configs' default hook
    dense = build_model(dense_cfg.model)
    assert not any(is_moe_module(m) for m in dense.modules())
    want = {}
    for key, value in moe.state_dict().items():
        layer = key.rpartition('.')[0]
        if '.gate.' in key or layer in layers and key.endswith('.gate'):
            continue
        want[key] = tuple(value.shape[1:]) if layer in layers else tuple(value.shape)
    assert {k: tuple(v.shape) for k, v in dense.state_dict().items()} == want


def test_pruned_config_rebuilds_a_pruned_model_with_shared_gates():
    """A MoEFPN with one gate for all output convs, pruned, saved and rebuilt from the
    written config: its checkpoint loads strictly and the two compute the same."""
    model_cfg = toy_retinanet()
    model_cfg.neck.update(type='MoEFPN', shared_gate=True, num_experts=4, top_k=2)
    cfg = load_config(TOY_BASE_CONFIG)
    cfg.model = model_cfg
    model = build_model(cfg.model).eval()
    names = [n for n, m in model.named_modules() if is_moe_module(m)]
    prune_model_experts(model, {name: [0, 2, 3] for name in names})
    rebuilt = build_model(pruned_config(cfg, {name: 3 for name in names}).model).eval()
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.neck.fpn_convs[0].conv.gate is rebuilt.neck.fpn_convs[1].conv.gate
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(rebuilt(images, mode='tensor'), model(images, mode='tensor')):
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w)
