"""MoEFPN: upcycling equals the dense FPN; its balance losses reach the detector."""
import pytest
import torch
from mmdet.registry import MODELS

from helpers import TOY_BASE_CONFIG, build_model, load_config, one_training_step
from mmdet_moe.layers import MoEConv2d

FPN = dict(in_channels=[8, 16, 32], out_channels=8, num_outs=5, add_extra_convs='on_input')


def inputs():
    return [torch.randn(2, c, s, s) for c, s in zip((8, 16, 32), (32, 16, 8), strict=True)]


@pytest.mark.parametrize('parts', [['output'], ['lateral', 'output', 'extra']])
def test_upcycled_moe_fpn_equals_fpn(parts):
    dense = MODELS.build(dict(type='FPN', **FPN)).eval()
    moe = MODELS.build(dict(type='MoEFPN', moe_parts=parts, **FPN)).eval()
    missing, unexpected = moe.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all('.gate.' in k for k in missing)
    n_moe = sum(isinstance(m, MoEConv2d) for m in moe.modules())
    assert n_moe == {1: 3, 3: 3 + 3 + 2}[len(parts)]
    x = inputs()
    with torch.no_grad():
        for got, want in zip(moe(x), dense(x), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_shared_gate_and_errors():
    moe = MODELS.build(dict(type='MoEFPN', moe_parts='output', shared_gate=True, **FPN))
    assert len({id(c.conv.gate) for c in moe.fpn_convs[:3]}) == 1
    with pytest.raises(ValueError, match='shared_gate'):
        MODELS.build(dict(type='MoEFPN', moe_parts='lateral', shared_gate=True, **FPN))
    with pytest.raises(ValueError, match="'extra'"):
        MODELS.build(dict(type='MoEFPN', moe_parts='extra',
                          **dict(FPN, add_extra_convs=False)))
    with pytest.raises(ValueError, match="'middle'"):
        MODELS.build(dict(type='MoEFPN', moe_parts='middle', **FPN))


def test_neck_and_head_losses_are_summed_in_the_detector():
    cfg = load_config(TOY_BASE_CONFIG)
    cfg.model.type = 'MoERetinaNet'
    cfg.model.neck.update(type='MoEFPN', balance_cfg=dict(importance=1.0))
    cfg.model.bbox_head.update(type='MoERetinaHead', balance_cfg=dict(importance=1.0))
    model = build_model(cfg.model)
    neck_layers = [m for m in model.neck.modules() if isinstance(m, MoEConv2d)]
    losses, _ = one_training_step(model)
    assert 'loss_moe_importance' in losses
    assert all(layer.weight.grad is not None for layer in neck_layers)
    # the summed value includes the neck's layers (gradient reaches their gates)
    assert all(layer.gate.w_gate.weight.grad.abs().sum() > 0 for layer in neck_layers)
