"""count_parameters and count_active_compute: parameters and FLOPs against counts of
the dense parts (mmengine's counter, hand formulas)."""
import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.registry import init_default_scope

from helpers import TOY_BASE_CONFIG, TOY_MOE_CONFIG
from mmdet_moe.layers import (COMPUTE_COLUMNS, CPMuMoEConv2d, MoE, MoEConv2d,
                              count_active_compute, count_flops, count_parameters)


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


@pytest.mark.slow
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


# ---- FLOPs per image: against mmengine's counter on the dense parts, and hand formulas


def mmengine_flops(module: nn.Module, *inputs) -> int:
    from mmengine.analysis import FlopAnalyzer
    return FlopAnalyzer(module.eval(), inputs).total()


@pytest.mark.parametrize('impl', ['fused', 'dispatch', 'dense'])
@pytest.mark.parametrize('gate_type', ['linear', 'conv'])
def test_upcycled_conv_costs_k_and_n_dense_convs(impl, gate_type):
    conv = nn.Conv2d(8, 16, 3, padding=1)
    moe = MoEConv2d.from_dense(conv, num_experts=4, top_k=2, impl=impl,
                               gate_cfg=dict(gate_type=gate_type))
    x = torch.randn(3, 8, 12, 10)
    layer = count_active_compute(moe, x).layers[0]
    dense = mmengine_flops(conv, x[:1])
    assert dense == 16 * 8 * 9 * 12 * 10  # no bias, one multiply-add = one flop
    # linear gate: GAP (free) + 8 → 4; conv gate: 3×3 conv 8 → 64, GAP, 64 → 4
    gate = 8 * 4 if gate_type == 'linear' else 64 * 8 * 9 * 12 * 10 + 64 * 4
    assert (layer.gate_flops, layer.expert_flops) == (gate, dense)
    assert layer.flops_n == gate + 4 * dense
    want_k = {'fused': gate + dense + 2 * (16 * 8 * 9 + 16),  # mix 2 kernels + biases
              'dispatch': gate + 2 * dense, 'dense': gate + 4 * dense}[impl]
    assert layer.flops_k == want_k
    if impl != 'fused':  # what the forward ran: k (dispatch) or N (dense) convs
        assert layer.measured_flops == want_k - gate
    assert (layer.rows_per_image, layer.num_experts, layer.top_k) == (1, 4, 2)


def test_subnet_experts_over_fpn_levels_cost_k_towers_per_level():
    """A head's MoE called with 3 levels: per image, an expert runs on each level."""
    moe = MoE.from_dense(tower(), num_experts=4, top_k=2, in_channels=8)
    levels = [torch.randn(2, 8, s, s) for s in (16, 8, 4)]
    compute = count_active_compute(moe, levels)
    layer = compute.layers[0]
    towers = sum(mmengine_flops(tower(), level[:1]) for level in levels)
    assert layer.expert_flops == towers and layer.rows_per_image == 3
    assert layer.gate_flops == 3 * 8 * 4
    assert layer.flops_k == layer.gate_flops + 2 * towers
    assert layer.measured_flops == 2 * towers
    assert layer.flops_n == layer.gate_flops + 4 * towers
    assert compute.other_flops == 0 and compute.flops_k == layer.flops_k


def test_equal_weights_run_every_expert():
    moe = MoE([tower() for _ in range(4)], in_channels=8, top_k=4,
              gate_cfg=dict(type='EqualWeightGate'))
    layer = count_active_compute(moe, torch.randn(2, 8, 8, 8)).layers[0]
    assert layer.top_k == 4 and layer.gate_flops == 0
    assert layer.flops_k == layer.flops_n == layer.measured_flops == 4 * layer.expert_flops


def test_mumoe_costs_its_forward_whatever_n():
    x = torch.randn(2, 8, 8, 8)
    costs = []
    for n in (16, 64):
        mumoe = CPMuMoEConv2d(8, 8, 3, padding=1, num_experts=n, rank=4).eval()
        layer = count_active_compute(mumoe, x).layers[0]
        assert layer.expert_flops is None and layer.flops_k == layer.flops_n
        # mmengine reads an einsum's count off numpy's printed einsum_path, rounded
        # to 4 significant digits; the dispatcher's bmm are exact
        assert layer.flops_k == pytest.approx(mmengine_flops(mumoe, x) / 2, rel=1e-3)
        costs.append(layer.flops_k)
    # the factor convs (8→4 3×3, 4→8 1×1) do not depend on N; per pixel and expert:
    # the gate logit (8 channels), its BatchNorm (1), the expert factor (rank 4)
    assert costs[1] - costs[0] == (64 - 16) * (8 + 1 + 4) * 8 * 8


def test_counter_restores_training_mode():
    moe = MoEConv2d(8, 8, 3, num_experts=4, top_k=2).train()
    count_active_compute(moe, torch.randn(1, 8, 6, 6))
    assert moe.training and moe.gate.training


@pytest.fixture(scope='module')
def toy_detectors():
    """The dense toy RetinaNet and the MoE toy one (cls tower + output conv as N=4
    subnet experts, k=2), one 96×96 image."""
    from helpers import build_model, toy_retinanet
    dense = build_model(toy_retinanet()).eval()
    moe = build_model(toy_retinanet(moe_branches='cls', num_experts=4, top_k=2)).eval()
    return dense, moe, torch.randn(1, 3, 96, 96)


@pytest.mark.slow
def test_whole_detector_agrees_with_mmengine(toy_detectors):
    """Against mmengine's counter on the dense detector: the MoE model's non-MoE part
    is the dense model less its cls tower; at k and N, k and N towers and the gate."""
    from mmengine.analysis import FlopAnalyzer
    dense, moe, x = toy_detectors
    analyzer = FlopAnalyzer(dense, (x,))
    total = analyzer.total()
    by_module = analyzer.by_module()
    tower_flops = by_module['bbox_head.cls_convs'] + by_module['bbox_head.retina_cls']
    assert count_flops(lambda: dense(x)) == total
    compute = count_active_compute(moe, x)
    (layer,) = compute.layers
    gate = 5 * 64 * 4  # linear gate per (image, level): 5 levels, 64 channels, N = 4
    assert layer.name == 'bbox_head.cls_moe' and layer.rows_per_image == 5
    assert layer.gate_flops == gate and layer.expert_flops == tower_flops
    assert compute.other_flops == total - tower_flops
    assert compute.flops_k == total + gate + tower_flops  # k = 2 towers for 1
    assert compute.flops_n == total + gate + 3 * tower_flops
    dense_params = count_parameters(dense).total
    assert compute.params.total == count_parameters(moe).total > dense_params


@pytest.mark.slow
def test_mmengine_counts_what_one_traced_forward_ran(toy_detectors):
    """mmengine's counter does not crash on a MoE model, nor know it: it traces one
    forward and counts the experts that ran on that input (k per row with dispatch),
    the same as the measured forward here; it cannot tell the cost at N."""
    from mmengine.analysis import FlopAnalyzer
    _, moe, x = toy_detectors
    compute = count_active_compute(moe, x)
    (layer,) = compute.layers
    assert FlopAnalyzer(moe, (x,)).total() == \
        compute.other_flops + layer.gate_flops + layer.measured_flops == compute.flops_k


def test_rows_hold_each_layer_and_the_model(toy_detectors):
    _, moe, x = toy_detectors
    compute = count_active_compute(moe, x)
    rows = compute.rows()
    assert [r['layer'] for r in rows] == ['bbox_head.cls_moe', 'model']
    assert all(tuple(r) == COMPUTE_COLUMNS for r in rows)
    assert rows[-1]['flops_k'] == compute.flops_k
    assert rows[-1]['params_active'] == count_parameters(moe).active
    assert rows[0]['kind'] == 'TowerMoE (dispatch)' and rows[0]['rows_per_image'] == 5


@pytest.mark.parametrize('impl', ['dispatch', 'dense'])
def test_per_location_routing_counts_locations_and_its_experts(impl):
    """A row per output location; k expert convs per location when dispatched, all N
    when dense (e = one expert conv over the image's map)."""
    moe = MoEConv2d(8, 8, 3, stride=2, padding=1, num_experts=4, top_k=2, impl=impl,
                    gate_cfg=dict(gate_mode='pixel'))
    layer = count_active_compute(moe, torch.randn(2, 8, 16, 16)).layers[0]
    assert layer.rows_per_image == 8 * 8
    assert layer.expert_flops == 8 * 8 * 9 * 8 * 8
    expected = layer.gate_flops + (2 if impl == 'dispatch' else 4) * layer.expert_flops
    assert layer.flops_k == pytest.approx(expected)
    assert layer.flops_n == pytest.approx(layer.gate_flops + 4 * layer.expert_flops)
