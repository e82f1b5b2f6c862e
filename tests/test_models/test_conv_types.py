"""MoE conv types from mmcv's conv_cfg (as DCNv2), their initialisation, bad input."""
import math
import os
import sys

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


@pytest.mark.parametrize('act_cfg', [dict(type='LeakyReLU', negative_slope=0.2), None])
def test_experts_equal_the_conv_module_kaiming_draws(act_cfg):
    """The values, not only their spread: with the same seed, each expert is the n-th
    draw of kaiming_normal_ (fan_out, gain of ConvModule's activation) after the
    layer's own construction; the bias 0."""
    torch.manual_seed(1)
    module = ConvModule(6, 10, 3, conv_cfg=dict(MOE, num_experts=3), act_cfg=act_cfg)
    torch.manual_seed(1)
    MoEConv2d(6, 10, 3, num_experts=3, top_k=2)  # the builder's draws
    slope = act_cfg['negative_slope'] if act_cfg else 0
    want = [nn.init.kaiming_normal_(torch.empty(10, 6, 3, 3), a=slope, mode='fan_out',
                                    nonlinearity='leaky_relu' if act_cfg else 'relu')
            for _ in range(3)]
    torch.testing.assert_close(module.conv.weight.detach(), torch.stack(want), rtol=0, atol=0)
    assert module.conv.bias.abs().sum() == 0


def test_only_fresh_conv_cfg_layers_take_the_conv_module_init():
    """A layer placed in a ConvModule later (insertion, pruning, a trained layer) keeps
    its weights; a conv_cfg layer first placed elsewhere keeps its own init."""
    trained = MoEConv2d(8, 8, 3, num_experts=3)
    with torch.no_grad():
        trained.weight.fill_(7.0)
    module = ConvModule(8, 8, 3)
    module.conv = trained
    assert (module.conv.weight == 7).all()

    holder = nn.Module()
    holder.conv = build_conv_layer(MOE, 8, 8, 3)
    want = holder.conv.weight.detach().clone()
    module.conv = holder.conv
    assert torch.equal(module.conv.weight, want)


def test_building_reads_no_stack_frames(monkeypatch):
    """Defect: the conv_cfg builder walked sys._getframe and read its callers' local
    variables. Every conv_cfg path now builds, initialises and checks without: no
    code of mmdet_moe asks for a frame, itself or through inspect (logging and torch
    still do, for their own purposes)."""
    import inspect

    import mmdet_moe
    from mmdet.models.dense_heads.tood_head import TaskDecomposition
    package, get_frame = os.path.dirname(mmdet_moe.__file__), sys._getframe

    def guarded_get_frame(depth=0):
        caller, above = get_frame(1).f_code.co_filename, get_frame(2).f_code.co_filename
        if caller.startswith(package) or (caller == inspect.__file__
                                          and above.startswith(package)):
            raise AssertionError(f'{above if caller == inspect.__file__ else caller} '
                                 'read a stack frame')
        return get_frame(depth + 1)

    monkeypatch.setattr(sys, '_getframe', guarded_get_frame)
    torch.manual_seed(0)
    module = ConvModule(64, 128, 3, padding=1, conv_cfg=MOE)
    torch.testing.assert_close(expert_stds(module.conv),
                               torch.full((4,), math.sqrt(2 / (128 * 9))), rtol=0.03, atol=0)
    ROOT_MODELS.build(dict(type='mmdet.FPN', in_channels=[8, 16], out_channels=8,
                           num_outs=3, add_extra_convs='on_input', conv_cfg=MOE))
    with pytest.raises(ValueError, match='TaskDecomposition.reduction_conv'):
        TaskDecomposition(32, 4, 8, conv_cfg=MOE)
    with pytest.raises(ValueError, match='with_spectral_norm=False'):
        ConvModule(8, 8, 3, conv_cfg=MOE, with_spectral_norm=True)


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
    (dict(MOE, top_k=5), {}, r'conv_cfg type MoEConv2d \(8→8 channels.*top_k.*got 5'),
    (dict(type='CPMuMoEConv2d', num_experts=8), dict(groups=2), 'groups=1 only, got groups=2'),
    (dict(MOE, num_expert=4), {}, r'conv_cfg type MoEConv2d \(8→8 channels.*num_expert'),
])
def test_bad_conv_cfg_fails_at_build_naming_type_geometry_and_value(conv_cfg, kwargs, match):
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
    with pytest.raises(ValueError, match='TaskDecomposition.reduction_conv.*inter_convs'):
        TaskDecomposition(32, 4, 8, conv_cfg=MOE)


def test_spectral_norm_conv_module_refuses_moe_at_build():
    refusal = r'MoEConv2d in ConvModule.conv: .*set with_spectral_norm=False'
    with pytest.raises(ValueError, match=refusal):
        ConvModule(8, 8, 3, conv_cfg=MOE, with_spectral_norm=True)


@pytest.mark.parametrize('turn_on_later', [False, True])
def test_efficient_conv_bn_eval_refuses_moe_at_the_first_forward(turn_on_later):
    """ConvModule enables it after placing its conv (or any time later, by
    turn_on_efficient_conv_bn_eval): refused when the module runs, in training too."""
    module = ConvModule(8, 8, 3, conv_cfg=MOE, norm_cfg=dict(type='BN'),
                        efficient_conv_bn_eval=not turn_on_later)
    if turn_on_later:
        module(torch.randn(2, 8, 5, 5))
        module.turn_on_efficient_conv_bn_eval()
    refusal = r'refused at the forward \(.*set efficient_conv_bn_eval=False'
    with pytest.raises(ValueError, match=refusal):
        module(torch.randn(2, 8, 5, 5))
    module.conv = nn.Conv2d(8, 8, 3)  # e.g. merged back into a dense conv: allowed
    assert module.eval()(torch.randn(2, 8, 5, 5)).shape == (2, 8, 3, 3)


@pytest.mark.parametrize('cfg, kwargs', [
    (dict(MOE, scale_factor=2), {}),
    (MOE, dict(output_padding=1)),  # a deconv's arguments
])
def test_upsample_layers_are_not_moe_convs(cfg, kwargs):
    from mmcv.cnn import build_upsample_layer
    refusal = '(scale_factor=2|output_padding=1).*build_upsample_layer'
    with pytest.raises(ValueError, match=refusal):
        build_upsample_layer(cfg, in_channels=8, out_channels=8, kernel_size=2, stride=2,
                             **kwargs)
