"""Remove experts from trained MoE layers, and fold single-conv experts into one conv.

Pruning keeps a subset of a layer's experts: their weights, their gate's rows (the
logit and noise weights) and its per-expert buffers (the usage statistic of a hard
constraint). An expert that was never among a row's top k does not change that row's
output when removed: the top k of the remaining logits are the same experts and the
softmax over the k kept logits the same weights (``renormalize=True``; a gate with
``renormalize=False`` weights experts by a softmax over all N logits, which changes).

Merging (CondConv's identity, see :func:`mixed_conv2d`) replaces a
:class:`MoEConv2d` by the dense conv ``Σ_i ḡ_i W_i`` (+ ``Σ_i ḡ_i b_i``): exact for a
gate that always gives weights ḡ (equal weights), the conv of the mean routing
otherwise.
"""
from collections import defaultdict
from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn

from .gates import EqualWeightGate, TopKGate
from .moe import MoE
from .moe_conv import MoEConv2d
from .recording import is_moe_module


def gate_groups(model: nn.Module) -> Dict[str, List[str]]:
    """The MoE modules of ``model`` grouped by the gate they share, ``{first name:
    [names]}`` in ``named_modules`` order (a module with its own gate is alone)."""
    groups: Dict[int, List[str]] = defaultdict(list)
    for name, module in model.named_modules():
        if is_moe_module(module):
            groups[id(getattr(module, 'gate', module))].append(name)
    return {names[0]: names for names in groups.values()}


def _check_keep(keep: Sequence[int], num_experts: int, top_k: int, where: str) -> List[int]:
    keep = list(keep)
    if sorted(set(keep)) != keep or not all(0 <= i < num_experts for i in keep):
        raise ValueError(f'{where}: experts to keep must be distinct indices in '
                         f'[0, {num_experts}) in increasing order, got {keep}')
    if len(keep) < max(top_k, 2):
        raise ValueError(
            f'{where}: keeping experts {keep} leaves {len(keep)} of {num_experts}, fewer '
            f'than {"top_k=" + str(top_k) if top_k >= 2 else "2"} (each row routes to '
            f'top_k={top_k} experts and a MoE layer needs at least 2); keep more experts')
    return keep


def _select_rows(linear: nn.Linear, keep: Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[keep].clone(),
                                 linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[keep].clone(),
                                   linear.bias.requires_grad)
    linear.out_features = len(keep)


def prune_gate(gate: nn.Module, keep: Sequence[int], where: str = 'gate') -> None:
    """Keep experts ``keep`` of a gate, in place: the rows of its logit (and noise)
    layer and its per-expert buffers; ``top_k`` stays."""
    if not isinstance(gate, (TopKGate, EqualWeightGate)):
        raise ValueError(f'{where}: cannot prune a gate of type {type(gate).__name__}')
    keep = _check_keep(keep, gate.num_experts, gate.top_k, where)
    if isinstance(gate, EqualWeightGate):  # top_k = N: only keeping all passes
        return
    index = torch.tensor(keep, device=gate.w_gate.weight.device)
    _select_rows(gate.w_gate, index)
    if getattr(gate, 'w_noise', None) is not None:
        _select_rows(gate.w_noise, index)
    if 'usage' in gate._buffers:  # hard constraints: per-expert statistic
        gate.usage = gate.usage[index].clone()
    gate.num_experts = len(keep)


def prune_experts(module: nn.Module, keep: Sequence[int], where: str = '',
                  with_gate: bool = True) -> None:
    """Keep experts ``keep`` (increasing indices) of a MoE module, in place; the
    experts are renumbered 0 … len(keep) − 1. ``with_gate=False`` leaves the gate (one
    shared with another module is pruned once). Raises ValueError (naming ``where``)
    for fewer than max(top_k, 2) experts or a layer without discrete experts.

    Example:
        >>> layer = MoEConv2d(8, 8, 3, num_experts=4, top_k=2)
        >>> prune_experts(layer, [0, 2, 3])
        >>> layer.weight.shape, layer.gate.w_gate.out_features
        (torch.Size([3, 8, 8, 3, 3]), 3)
    """
    where = where or type(module).__name__
    if not isinstance(module, (MoEConv2d, MoE)):
        raise ValueError(
            f'{where}: a {type(module).__name__} has no discrete experts to remove'
            + (' (μMoE layers route softly over all experts through factorised weights)'
               if is_moe_module(module) else ' (not a MoE layer)'))
    keep = _check_keep(keep, module.num_experts, module.top_k, where)
    if with_gate:
        prune_gate(module.gate, keep, f'{where}.gate')
    if isinstance(module, MoEConv2d):
        index = torch.tensor(keep, device=module.weight.device)
        module.weight = nn.Parameter(module.weight.detach()[index].clone(),
                                     module.weight.requires_grad)
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.detach()[index].clone(),
                                       module.bias.requires_grad)
    else:
        module.experts = nn.ModuleList([module.experts[i] for i in keep])
    module.num_experts = len(keep)


def prune_model_experts(model: nn.Module, keep: Dict[str, Sequence[int]]) -> None:
    """Prune the MoE modules of ``model`` named in ``keep`` (``{module path: expert
    indices}``), in place. Modules sharing a gate must all be named, with the same
    experts (the gate routes them together). Nothing changes when it raises."""
    groups = gate_groups(model)
    member_of = {name: names for names in groups.values() for name in names}
    plan = []
    for name, experts in keep.items():
        if name not in member_of:
            raise ValueError(f'{name!r} is not a MoE module of {type(model).__name__}; '
                             f'its MoE modules: {sorted(member_of)}')
        for other in member_of[name]:
            if list(keep.get(other, ())) != list(experts):
                raise ValueError(
                    f'{name} and {other} share one gate and must keep the same experts; '
                    f'got {list(experts)} and {keep.get(other, "nothing")}')
        module = model.get_submodule(name)
        if not isinstance(module, (MoEConv2d, MoE)):
            prune_experts(module, experts, name)  # raises: no discrete experts
        _check_keep(experts, module.num_experts, module.top_k, name)
        plan.append((name, module, member_of[name][0] == name))
    for name, module, owns_gate in plan:  # every check passed: now change the model
        prune_experts(module, keep[name], name, with_gate=owns_gate)


def merged_conv(layer: MoEConv2d, gates: Tensor) -> nn.Conv2d:
    """The dense ``nn.Conv2d`` computing ``Σ_i g_i (W_i ∗ x + b_i)`` for fixed gate
    weights ``gates`` (N,), e.g. the mean gate weights over a validation set.

    Example:
        >>> layer = MoEConv2d(8, 8, 3, padding=1, num_experts=4, top_k=4,
        ...                   gate_cfg=dict(type='EqualWeightGate'))
        >>> x = torch.randn(2, 8, 5, 5)
        >>> conv = merged_conv(layer.eval(), torch.full((4,), 0.25))
        >>> torch.allclose(conv(x), layer(x), atol=1e-5)
        True
    """
    if not isinstance(layer, MoEConv2d):
        raise ValueError(f'merging needs a MoEConv2d (linear single-conv experts), got '
                         f'{type(layer).__name__}')
    gates = torch.as_tensor(gates, dtype=layer.weight.dtype, device=layer.weight.device)
    if gates.shape != (layer.num_experts,) or not torch.isfinite(gates).all():
        raise ValueError(f'gates must be {layer.num_experts} finite weights (one per '
                         f'expert), got {gates.tolist()}')
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                     layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                     device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum('n,n...->...', gates, layer.weight))
        if layer.bias is not None:
            conv.bias.copy_(gates @ layer.bias)
    return conv

