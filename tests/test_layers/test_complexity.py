"""count_parameters: total and active parameters against counts of the dense parts."""
import pytest
import torch.nn as nn
from mmengine.config import Config
from mmengine.registry import init_default_scope

from helpers import TOY_BASE_CONFIG, TOY_MOE_CONFIG
from mmdet_moe.layers import CPMuMoEConv2d, MoE, MoEConv2d, count_parameters


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tower(channels=8):
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(channels, 5, 3, padding=1))


@pytest.mark.parametrize('num_experts,top_k', [(4, 1), (4, 2), (8, 3)])
def test_subnet_moe_runs_k_experts_and_its_gate(num_experts, top_k):
    moe = MoE([tower() for _ in range(num_experts)], in_channels=8, top_k=top_k,
              gate_cfg=dict(renormalize=top_k > 1))
    expert, gate = numel(tower()), numel(moe.gate)
    count = count_parameters(moe)
    assert count.total == gate + num_experts * expert
    assert count.active == gate + top_k * expert


def test_moe_conv_mixes_k_kernels():
    moe = MoEConv2d(8, 16, 3, num_experts=6, top_k=2)
    dense = nn.Conv2d(8, 16, 3)
    assert count_parameters(moe).active == numel(moe.gate) + 2 * numel(dense)
    assert count_parameters(moe).total == numel(moe)


def test_equal_weights_and_mumoe_use_every_parameter():
    equal = MoE([tower() for _ in range(4)], in_channels=8, top_k=4,
                gate_cfg=dict(type='EqualWeightGate'))
    mumoe = CPMuMoEConv2d(8, 8, 3, padding=1, num_experts=64, rank=4)
    for module in (equal, mumoe):
        assert count_parameters(module).active == count_parameters(module).total == \
            numel(module)


def test_shared_parameters_count_once():
    conv = nn.Conv2d(4, 4, 1)
    model = nn.ModuleDict(dict(a=conv, b=conv))
    assert count_parameters(model).total == numel(conv)


def test_toy_moe_detector_against_the_dense_detector():
    """The toy MoE RetinaNet replaces the classification tower and output conv by
    N=4 copies (k=2) and adds a gate: 3 extra towers in total, 1 active."""
    from mmdet.registry import MODELS
    import mmdet_moe  # noqa: F401
    init_default_scope('mmdet')
    dense = MODELS.build(Config.fromfile(TOY_BASE_CONFIG).model)
    moe = MODELS.build(Config.fromfile(TOY_MOE_CONFIG).model)
    tower = numel(dense.bbox_head.cls_convs) + numel(dense.bbox_head.retina_cls)
    gate = numel(moe.bbox_head.cls_moe.gate)
    count = count_parameters(moe)
    assert count.total == numel(dense) + 3 * tower + gate
    assert count.active == numel(dense) + 1 * tower + gate
    assert count_parameters(dense).total == count_parameters(dense).active == numel(dense)
