"""Pure-PyTorch MoE layers (no mmdet import): gates, balancing losses, hard
constraints, conv experts, MoE containers, multilinear (μMoE) layers, recording."""
from .balance_losses import (BALANCE_LOSSES, BalanceLosses, cv_squared, importance_loss,
                             kl_uniform_loss, load_loss, prob_in_top_k, router_z_loss,
                             switch_loss)
from .base import MoEModuleMixin
from .complexity import (COMPUTE_COLUMNS, ActiveCompute, LayerCompute, ParameterCount,
                         count_active_compute, count_parameters)
from .flops import FlopCounter, count_flops
from .conv_ops import dense_mixture, dispatch, dispatch_with_capacity, mixed_conv2d
from .export import (ExportError, LayerExport, export_mode, export_onnx,
                     export_plans, run_onnx)
from .gate_output import GateOutput
from .gates import (GATE_MODES, GATE_TYPES, GATES, AbsoluteImportanceGate,
                    EqualWeightGate, NonFiniteGateError, RelativeImportanceGate, TopKGate,
                    build_gate, end_iteration, global_importance, pixel_map, routes_pixels)
from .moe import MoE
from .moe_conv import MoEConv2d
from .multilinear import (CPMuMoE, CPMuMoEConv2d, TRMuMoE, TRMuMoEConv2d,
                          rank_for_params)
from .pixel_routing import dense_pixel_conv2d, pixel_mixture, routed_pixel_conv2d
from .pruning import gate_groups, merged_conv, prune_experts, prune_model_experts
from .routing_override import override_routing
from .recording import (GateRecord, GateRecorder, assign_moe_names, is_moe_module,
                        mark_row_images, record_gate, record_gates)

__all__ = [
    'AbsoluteImportanceGate', 'ActiveCompute', 'assign_moe_names', 'BALANCE_LOSSES',
    'BalanceLosses', 'build_gate', 'COMPUTE_COLUMNS', 'count_active_compute',
    'count_flops', 'count_parameters', 'CPMuMoE', 'CPMuMoEConv2d', 'cv_squared',
    'dense_mixture', 'dispatch', 'dispatch_with_capacity', 'end_iteration',
    'EqualWeightGate', 'export_mode', 'export_onnx', 'export_plans', 'ExportError',
    'dense_pixel_conv2d', 'FlopCounter', 'gate_groups', 'GATE_MODES', 'GATE_TYPES', 'GateOutput', 'GateRecord',
    'GateRecorder', 'GATES', 'global_importance', 'importance_loss', 'is_moe_module',
    'kl_uniform_loss', 'LayerCompute', 'LayerExport', 'load_loss', 'mark_row_images',
    'merged_conv', 'mixed_conv2d', 'MoE', 'MoEConv2d', 'MoEModuleMixin',
    'NonFiniteGateError', 'override_routing', 'ParameterCount', 'pixel_map',
    'pixel_mixture', 'prob_in_top_k', 'routed_pixel_conv2d', 'routes_pixels',
    'prune_experts', 'prune_model_experts', 'rank_for_params', 'record_gate',
    'record_gates', 'RelativeImportanceGate', 'router_z_loss', 'run_onnx',
    'switch_loss', 'TopKGate', 'TRMuMoE', 'TRMuMoEConv2d'
]
