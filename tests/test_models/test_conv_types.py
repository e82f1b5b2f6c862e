"""MoE conv types from mmcv's conv_cfg (as DCNv2), their initialisation, bad input."""
import math

import pytest
import torch
import torch.nn as nn
from mmcv.cnn import ConvModule, build_conv_layer
from mmengine.registry import MODELS as ROOT_MODELS

from helpers import build_model
from mmdet_moe.layers import CPMuMoEConv2d, MoEConv2d

MOE = dict(type='MoEConv2d', num_experts=4, top_k=2)


def test_conv_module_builds_moe_convs_from_conv_cfg():
    module = ConvModule(16, 32, 3, padding=1, conv_cfg=MOE, norm_cfg=dict(type='BN'))
    assert isinstance(module.conv, MoEConv2d)
    assert (module.in_channels, module.out_channels, module.groups) == (16, 32, 1)
    assert module.conv.num_experts == 4 and module.conv.bias is None  # bias='auto' + BN
    assert module(torch.randn(2, 16, 8, 8)).shape == (2, 32, 8, 8)
    # without any default scope, from mmengine's root registry as mmcv's own convs
    assert isinstance(build_conv_layer(MOE, 8, 8, 1), MoEConv2d)
    assert isinstance(build_conv_layer(dict(type='CPMuMoEConv2d', num_experts=8), 8, 8, 3,
                                       padding=1), CPMuMoEConv2d)
    assert {'MoEConv2d', 'CPMuMoEConv2d', 'TRMuMoEConv2d'} <= set(ROOT_MODELS.module_dict)


def test_fpn_and_head_convs_from_one_config_line():
    fpn = ROOT_MODELS.build(dict(type='mmdet.FPN', in_channels=[8, 16], out_channels=8,
                                 num_outs=3, add_extra_convs='on_input', conv_cfg=MOE))
    assert sum(isinstance(m, MoEConv2d) for m in fpn.modules()) == 2 + 3


def expert_stds(layer):
    return torch.stack([w.std() for w in layer.weight.detach()])


def test_experts_start_as_conv_module_initialises_its_conv():
    """Each expert has the weight distribution of the dense ConvModule conv:
    kaiming normal, fan_out, gain sqrt(2) (mmcv's default), bias 0."""
    torch.manual_seed(0)
    module = ConvModule(64, 128, 3, padding=1, conv_cfg=MOE)
    want = math.sqrt(2 / (128 * 9))
    torch.testing.assert_close(expert_stds(module.conv), torch.full((4,), want), rtol=0.03,
                               atol=0)
    assert not torch.equal(module.conv.weight[0], module.conv.weight[1])
    assert module.conv.bias.abs().sum() == 0


def test_moe_fpn_experts_start_as_fpn_initialises_its_convs():
    """Defect: MoEFPN experts got std 0.024 against 0.042 for FPN's Xavier init
    (its init_cfg names only Conv2d). The reference: xavier uniform's formula."""
    torch.manual_seed(0)
    neck = build_model(dict(type='MoEFPN', in_channels=[64, 128], out_channels=64,
                            num_outs=2, moe_parts=('lateral', 'output')))
    dense = build_model(dict(type='FPN', in_channels=[64, 128], out_channels=64, num_outs=2))
    for i in range(2):
        for part in ('lateral_convs', 'fpn_convs'):
            moe_conv = getattr(neck, part)[i].conv
            dense_conv = getattr(dense, part)[i].conv
            fan_in = dense_conv.weight[0].numel()
            fan_out = dense_conv.weight.shape[0] * dense_conv.weight[0, 0].numel()
            want = math.sqrt(2 / (fan_in + fan_out))  # std of xavier_uniform_
            torch.testing.assert_close(dense_conv.weight.std(), torch.tensor(want),
                                       rtol=0.05, atol=0)
            torch.testing.assert_close(expert_stds(moe_conv), torch.full((4,), want),
                                       rtol=0.05, atol=0)
            assert moe_conv.bias.abs().sum() == 0  # FPN's init_cfg: bias 0


def test_owner_init_cfg_reaches_every_expert_and_is_not_undone():
    """A MoE conv replacing a BaseModule's plain conv (rpn_conv) gets the owner's
    Normal(std=0.01) init, per expert, and its own init_weights does not reset it."""
    from mmdet_moe.models import insert_moe_layers
    head = build_model(dict(type='RPNHead', in_channels=64, feat_channels=64,
                            anchor_generator=dict(type='AnchorGenerator', scales=[8],
                                                  ratios=[1.0], strides=[4])))
    insert_moe_layers(head, [dict(paths='rpn_conv', num_experts=3)])
    head._is_init = False
    head.init_weights()
    torch.testing.assert_close(expert_stds(head.rpn_conv), torch.full((3,), 0.01),
                               rtol=0.05, atol=0)


def test_expert_convs_share_storage():
    layer = MoEConv2d(4, 6, 3, num_experts=3)
    convs = layer.expert_convs()
    with torch.no_grad():
        nn.init.constant_(convs[1].weight, 7.0)
    assert (layer.weight[1] == 7).all() and not (layer.weight[0] == 7).any()
    assert len(list(layer.parameters())) == len(list(MoEConv2d(4, 6, 3).parameters()))


@pytest.mark.parametrize('conv_cfg, kwargs, match', [
    (dict(MOE, top_k=5), {}, r'built in FPN > ConvModule.*top_k.*got 5'),
    (dict(type='CPMuMoEConv2d', num_experts=8), dict(groups=2), 'groups=1 only, got groups=2'),
    (dict(MOE, num_expert=4), {}, r"built in FPN > ConvModule.*num_expert"),
])
def test_bad_conv_cfg_fails_at_build_naming_modules_and_value(conv_cfg, kwargs, match):
    from mmdet.models.necks import FPN
    if kwargs:  # FPN has no grouped convs: a ConvModule alone
        with pytest.raises(ValueError, match=match):
            ConvModule(8, 8, 3, conv_cfg=conv_cfg, **kwargs)
        return
    with pytest.raises(ValueError, match=match):
        FPN([8, 16], 8, 2, conv_cfg=conv_cfg)


def test_conv_cfg_in_tood_task_decomposition_fails_at_build():
    """TOOD's TaskDecomposition reads reduction_conv.conv.weight instead of calling the
    conv: a MoE conv there would never route. Build-time error, not a shape error in
    the first forward."""
    from mmdet.models.dense_heads.tood_head import TaskDecomposition
    with pytest.raises(ValueError, match='TaskDecomposition.reduction_conv'):
        TaskDecomposition(32, 4, 8, conv_cfg=MOE)


@pytest.mark.parametrize('build, match', [
    (lambda: ConvModule(8, 8, 3, conv_cfg=MOE, norm_cfg=dict(type='BN'),
                        efficient_conv_bn_eval=True), 'efficient_conv_bn_eval=False'),
    (lambda: ConvModule(8, 8, 3, conv_cfg=MOE, with_spectral_norm=True),
     'with_spectral_norm=False'),
])
def test_conv_modules_that_rewrite_their_conv_weight_refuse_moe(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_upsample_layers_are_not_moe_convs():
    from mmcv.cnn import build_upsample_layer
    with pytest.raises(ValueError, match='build_upsample_layer'):
        build_upsample_layer(dict(MOE, scale_factor=2), in_channels=8, out_channels=8,
                             kernel_size=2, stride=2)
