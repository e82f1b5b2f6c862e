"""Parameters a MoE model holds, those one routing decision uses, and the FLOPs per
image of its MoE layers at k and at N experts."""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .flops import FlopCounter, count_flops
from .gates import routes_pixels
from .moe import MoE
from .moe_conv import MoEConv2d
from .pixel_routing import gate_input


@dataclass(frozen=True)
class ParameterCount:
    """``total``: every parameter; ``active``: those one gate row (an image, or an
    (image, FPN level) for a head shared over levels) runs through."""
    total: int
    active: int


def count_parameters(model: nn.Module) -> ParameterCount:
    """Total and active parameters of ``model``.

    A MoE module that routes each row to ``top_k`` of its N equally sized experts
    (:class:`~mmdet_moe.layers.MoE`, :class:`~mmdet_moe.layers.MoEConv2d`) uses k/N of
    its expert parameters per row (the fused MoEConv2d mixes k kernels into one);
    an equal-weight gate (k = N) and μMoE layers (soft routing over all experts)
    use all of theirs. Parameters shared by several modules count once.

    Example:
        >>> from mmdet_moe.layers import MoEConv2d
        >>> count_parameters(MoEConv2d(8, 8, 3, num_experts=4, top_k=2))
        ParameterCount(total=2408, active=1240)
    """
    total = sum(p.numel() for p in model.parameters())  # each shared one once
    inactive, counted = 0, set()
    for module in model.modules():
        experts = getattr(module, 'expert_parameters', None)
        if experts is None:
            continue
        own = [p for p in experts() if id(p) not in counted]
        counted.update(id(p) for p in own)
        inactive += sum(p.numel() for p in own) * (module.num_experts - module.top_k) \
            // module.num_experts
    return ParameterCount(total, total - inactive)


@dataclass(frozen=True)
class LayerCompute:
    """Parameters and FLOPs per image of one MoE layer (see :func:`count_active_compute`).

    Attributes:
        name: the layer's path in the model.
        kind: class and implementation, e.g. ``'MoE (dispatch)'``.
        num_experts, top_k: N and k (k = N for soft routing and equal weights).
        rows_per_image: gate rows per image (e.g. 5 for a head shared over 5 levels).
        params: :func:`count_parameters` of the layer (active: per gate row).
        gate_flops: the gate, per image (a gate shared by several layers counts
            with the first of them; a μMoE layer's gate is in its forward).
        expert_flops: one expert on all rows of one image; None for a μMoE layer
            (no expert exists on its own).
        flops_k: per image, as the layer runs with k experts per row.
        flops_n: per image, with all N experts run on every row.
        measured_flops: per image, what the counted forward ran (gate excluded);
            for a fused layer its kernel mixing depends on the batch size.
    """
    name: str
    kind: str
    num_experts: int
    top_k: int
    rows_per_image: float
    params: ParameterCount
    gate_flops: float
    expert_flops: Optional[float]
    flops_k: float
    flops_n: float
    measured_flops: float


@dataclass(frozen=True)
class ActiveCompute:
    """Parameters and FLOPs per image of a model and of each of its MoE layers.

    Attributes:
        layers: one :class:`LayerCompute` per outermost MoE module.
        params: :func:`count_parameters` of the whole model.
        other_flops: per image, everything outside the MoE layers and their gates.
        num_images: images of the counted forward.
    """
    layers: List[LayerCompute]
    params: ParameterCount
    other_flops: float
    num_images: int

    @property
    def flops_k(self) -> float:
        return self.other_flops + sum(layer.flops_k for layer in self.layers)

    @property
    def flops_n(self) -> float:
        return self.other_flops + sum(layer.flops_n for layer in self.layers)

    def rows(self) -> List[dict]:
        """One dict per MoE layer and one for the whole model (``layer='model'``),
        with the keys of :data:`COMPUTE_COLUMNS`, numbers unscaled."""
        rows = [dict(layer=layer.name, kind=layer.kind, N=layer.num_experts,
                     k=layer.top_k, rows_per_image=layer.rows_per_image,
                     params_total=layer.params.total, params_active=layer.params.active,
                     flops_k=layer.flops_k, flops_n=layer.flops_n)
                for layer in self.layers]
        rows.append(dict(layer='model', kind='whole model', N=None, k=None,
                         rows_per_image=None, params_total=self.params.total,
                         params_active=self.params.active, flops_k=self.flops_k,
                         flops_n=self.flops_n))
        return rows


COMPUTE_COLUMNS = ('layer', 'kind', 'N', 'k', 'rows_per_image', 'params_total',
                   'params_active', 'flops_k', 'flops_n')


def _outermost_moe_layers(model: nn.Module) -> Dict[str, nn.Module]:
    layers = {}
    for name, module in model.named_modules():
        if getattr(module, 'is_moe_module', False) and \
                not any(name.startswith(outer + '.') for outer in layers):
            layers[name or type(module).__name__] = module
    return layers


def _one_row_per_level(x) -> List[Tuple[Tensor, int]]:
    """(one row, rows) for each map of a call's input (a map or a list of levels)."""
    maps = x if isinstance(x, (list, tuple)) else [x]
    return [(level[:1], level.shape[0]) for level in maps]


def _expert_row_flops(layer: nn.Module, row: Tensor) -> Optional[int]:
    """FLOPs of expert 0 on one row; None for a layer without experts of its own."""
    if isinstance(layer, MoEConv2d):
        return count_flops(lambda: layer.expert_forward(0, row))
    if isinstance(layer, MoE):
        return count_flops(lambda: layer.experts[0](row))
    return None


def _layer_compute(name: str, layer: nn.Module, calls: List[list], flops: Dict,
                   num_images: int) -> LayerCompute:
    num_experts = layer.num_experts
    top_k = getattr(layer, 'top_k', num_experts)  # μMoE: soft routing over all
    impl = getattr(layer, 'impl', None)
    # a μMoE layer (no .gate) may route per location too, but its cost is its forward
    pixels = hasattr(layer, 'gate') and routes_pixels(layer)
    if pixels:  # every location a row; conv experts run k per location or all N
        impl = 'dispatch' if isinstance(layer, MoEConv2d) and layer.groups == 1 and \
            layer.pixel_impl() == 'dispatch' else 'dense'
        stride = getattr(layer, 'stride', (1, 1))
        rows = sum(n * gate_input(row, stride)[0, 0].numel()
                   for call in calls for row, n in call)
    else:
        impl = 'fused' if impl == 'auto' else impl  # MoEConv2d's auto is fused
        rows = sum(n for call in calls for _, n in call)
    gate = flops.get((name, 'gate'), 0) / num_images
    measured = flops.get((name, 'layer'), 0) / num_images
    costs = [(_expert_row_flops(layer, row), n) for call in calls for row, n in call]
    if not costs or costs[0][0] is None:  # μMoE: the cost is its forward, whatever N
        expert = None
        flops_k = flops_n = gate + measured
    else:
        expert = sum(c * n for c, n in costs) / num_images
        flops_n = gate + num_experts * expert
        if impl == 'fused':  # k kernels (and biases) mixed per row, then one conv
            per_expert = sum(p.numel() for p in layer.expert_parameters()) // num_experts
            flops_k = gate + expert + top_k * per_expert * rows / num_images
        elif impl == 'dense':  # the reference runs every expert on every row
            flops_k = flops_n
        else:
            flops_k = gate + top_k * expert
    return LayerCompute(name, type(layer).__name__ + (f' ({impl})' if impl else ''),
                        num_experts, top_k, rows / num_images, count_parameters(layer),
                        gate, expert, flops_k, flops_n, measured)


def count_active_compute(model: nn.Module, *inputs, num_images: Optional[int] = None,
                         **kwargs) -> ActiveCompute:
    """Parameters and FLOPs per image of ``model`` and of each MoE layer in it.

    Runs ``model(*inputs, **kwargs)`` once, in eval mode (restored after) without
    gradients, so every layer sees its real input shapes (e.g. per FPN level).
    FLOPs follow mmengine's ``get_model_complexity_info`` (one multiply-add is one
    flop; conv and linear biases, ReLU and the gates' average pools are free; see
    :mod:`.flops`); a gate row is an image, or an (image, FPN level) for a head
    shared over levels. Per MoE layer, with ``e`` = one expert on the rows of one
    image (measured on one row of each call's input, times the rows):

    - at N: ``gate + N · e``: every expert on every row (the equal-weight baseline,
      a graph exported without routing);
    - at k, as the layer's implementation runs: dispatch ``gate + k · e``; fused
      (single-conv experts) ``gate + e + rows · k · |expert|``: k kernels and
      biases mixed per row (one multiply-add per weight each), then one conv;
      ``impl='dense'`` (the reference) runs all N; a μMoE layer (soft routing, no
      expert of its own) costs its measured forward at k and at N alike. Per-location
      gates (a row per location): conv experts dispatched per location ``gate + k ·
      e``, all-N conv experts and whole-subnet experts (each on the whole map, mixed
      per location) ``gate + N · e``.

    Parameters active are per gate row (:func:`count_parameters`): over the rows
    of one image (e.g. 5 FPN levels) a shared head may use more experts.

    Args:
        model: any module; MoE layers are found by ``is_moe_module``.
        *inputs, **kwargs: the forward's arguments, e.g. a (B, 3, H, W) batch for
            an mmdet detector (``mode='tensor'``, backbone to head outputs).
        num_images: images in the batch; default: the first input's dim 0.

    Example:
        >>> from mmdet_moe.layers import MoEConv2d
        >>> moe = MoEConv2d(8, 8, 3, padding=1, num_experts=4, top_k=2)
        >>> compute = count_active_compute(moe, torch.randn(2, 8, 16, 16))
        >>> layer = compute.layers[0]  # conv: 8·8·9 · 16·16; gate: 8·4; mixing 2·(576+8)
        >>> layer.expert_flops, layer.flops_k, layer.flops_n
        (147456.0, 148656.0, 589856.0)
    """
    if num_images is None:
        first = inputs[0] if inputs else next(iter(kwargs.values()))
        num_images = (first[0] if isinstance(first, (list, tuple)) else first).shape[0]
    layers = _outermost_moe_layers(model)
    groups = {}
    for name, layer in layers.items():
        groups[layer] = (name, 'layer')
        gate = getattr(layer, 'gate', None)
        if isinstance(gate, nn.Module) and gate not in groups:  # a shared gate: once
            groups[gate] = (name, 'gate')
    calls = {name: [] for name in layers}
    hooks = [layer.register_forward_pre_hook(
        lambda _, args, name=name: calls[name].append(_one_row_per_level(args[0])))
        for name, layer in layers.items()]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), FlopCounter(groups) as counter:
            model(*inputs, **kwargs)
        result = [_layer_compute(name, layer, calls[name], counter.by_group, num_images)
                  for name, layer in layers.items()]
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    return ActiveCompute(result, count_parameters(model),
                         counter.by_group.get(None, 0) / num_images, num_images)
