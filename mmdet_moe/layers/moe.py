"""MoE: a sparsely-gated mixture of arbitrary (e.g. non-linear, multi-conv) experts."""
import copy
from typing import Callable, Iterator, List, Optional, Sequence, Union

import torch.nn as nn
import torch
from torch import Tensor

from ._checks import check_capacity_impl, check_choice, check_num_experts, has_zero_padding
from .base import MoEModuleMixin
from .conv_ops import dense_mixture, mixed_conv2d
from .gate_output import GateOutput
from .gates import TopKGate, build_gate, pixel_map, routes_pixels
from .moe_conv import IMPLS, noisy_copy
from .pixel_routing import pixel_conv2d, pixel_mixture, same_padding

_CONV_GEOMETRY = ('in_channels', 'out_channels', 'kernel_size', 'stride', 'padding',
                  'dilation', 'groups', 'padding_mode')

Features = Union[Tensor, Sequence[Tensor]]


def _conv_signature(module: nn.Module):
    """Geometry of a plain linear conv expert, or None if it cannot be fused."""
    if type(module) is not nn.Conv2d or not has_zero_padding(module):
        return None
    return tuple(getattr(module, a) for a in _CONV_GEOMETRY) + (module.bias is not None,)


class MoE(MoEModuleMixin, nn.Module):
    r"""Mixture of N expert modules with per-row noisy top-k gating.

    ``y_b = Σ_{n ∈ topk(b)} G_bn · E_n(x_b)``, running each expert only on the rows
    routed to it. Called with a list of feature maps (FPN levels), one gate is
    shared by all levels and applied to each separately, so routing is per
    (image, level); the balance losses use the gate rows of all levels together.

    Args:
        experts: the expert modules (all with the same parameter shapes), or None
            with ``expert_factory`` and ``num_experts``.
        in_channels: input channels C seen by the gate (not needed with ``gate``).
        top_k: experts per row.
        expert_factory: ``f() -> nn.Module`` building one expert.
        num_experts: N, with ``expert_factory``.
        gate: an existing gate module to use (e.g. shared with another MoE).
        gate_cfg: gate config when ``gate`` is None (see ``build_gate``).
        balance_cfg: auxiliary losses, e.g. ``dict(importance=0.5)``.
        impl: ``'dispatch'``, ``'dense'`` (reference), ``'fused'`` (only for plain
            ``nn.Conv2d`` experts of one geometry) or ``'auto'`` (fused when valid).
        capacity_factor: with ``impl='dispatch'``, fixed rows per expert in training,
            ``min(ceil(capacity_factor · B · k / N), B)`` per call (B rows: one FPN
            level's images for a shared head): no host read per call, rows over
            an expert's capacity dropped and counted (:meth:`pop_overflow`). None:
            every routed row runs (one host read per step, for all levels of a call, to
            size the batches).

    Shapes: (B, C, H, W) → (B, C', H', W'); a list of L maps → a list of L maps.
    """

    def __init__(self, experts: Optional[Sequence[nn.Module]] = None,
                 in_channels: Optional[int] = None, top_k: int = 2, *,
                 expert_factory: Optional[Callable[[], nn.Module]] = None,
                 num_experts: Optional[int] = None, gate: Optional[TopKGate] = None,
                 gate_cfg: Optional[dict] = None, balance_cfg: Optional[dict] = None,
                 impl: str = 'auto', capacity_factor: Optional[float] = None):
        super().__init__()
        if (experts is None) == (expert_factory is None):
            raise ValueError('give either experts or expert_factory + num_experts')
        if experts is None:
            check_num_experts(num_experts, top_k)
            experts = [expert_factory() for _ in range(num_experts)]
        check_num_experts(len(experts), top_k)
        check_choice('impl', impl, IMPLS)
        self.experts = nn.ModuleList(experts)
        self.num_experts, self.top_k = len(experts), top_k
        self._check_same_structure()
        if gate is None:
            if in_channels is None:
                raise ValueError('MoE needs in_channels to build its gate')
            gate = build_gate(gate_cfg, in_channels, self.num_experts, top_k)
        elif gate.num_experts != self.num_experts or gate.top_k != top_k:
            raise ValueError(f'the shared gate routes to {gate.num_experts} experts with '
                             f'top_k={gate.top_k}, this MoE has {self.num_experts} '
                             f'experts with top_k={top_k}')
        self.gate = gate
        self._init_moe(balance_cfg, noisy=gate.noisy, capacity_factor=capacity_factor)
        fusable = self.fusable()
        if impl == 'fused' and not fusable:
            raise ValueError("impl='fused' needs plain nn.Conv2d experts of one geometry "
                             f'(zero padding); got {type(experts[0]).__name__} experts')
        self.impl = ('fused' if fusable else 'dispatch') if impl == 'auto' else impl
        check_capacity_impl(capacity_factor, self.impl)
        if routes_pixels(gate) and capacity_factor is not None:
            raise ValueError(f'capacity_factor={capacity_factor!r} caps rows per expert; '
                             "gate_mode='pixel' runs each expert on whole maps: leave it None")

    def _check_same_structure(self):
        shapes = [[tuple(p.shape) for p in e.parameters()] for e in self.experts]
        for n, expert_shapes in enumerate(shapes):
            if expert_shapes != shapes[0]:
                raise ValueError(f'expert {n} has parameter shapes {expert_shapes}, '
                                 f'expert 0 has {shapes[0]}: experts must match')

    def fusable(self) -> bool:
        """True if all experts are linear convs of one geometry (kernel mixing is exact)."""
        signatures = {_conv_signature(e) for e in self.experts}
        return len(signatures) == 1 and None not in signatures

    @classmethod
    def from_dense(cls, module: nn.Module, num_experts: int = 4, top_k: int = 2,
                   noise_std: float = 0.0, **kwargs) -> 'MoE':
        """Upcycle ``module``: N deep copies as experts, each parameter plus
        Gaussian noise of ``noise_std × std(parameter)``; exact when noise_std = 0."""
        experts = []
        for _ in range(num_experts):
            expert = copy.deepcopy(module)
            if noise_std > 0:
                with torch.no_grad():
                    for p in expert.parameters():
                        p.copy_(noisy_copy(p, noise_std))
            experts.append(expert)
        return cls(experts, top_k=top_k, **kwargs)

    def route(self, x: Features) -> GateOutput:
        """Gate ``x`` (a map or a list of level maps), record and keep the rows."""
        gate_output = self.gate(x)
        levels = isinstance(x, (list, tuple))
        shapes = ([level.shape for level in x] if levels else [x.shape]) \
            if routes_pixels(self.gate) else None
        self._track(gate_output, self._row_counts(x) if levels else None, shapes)
        return gate_output

    def _row_counts(self, x: Sequence[Tensor]) -> List[int]:
        """Gate rows per level map: its images, or its locations for a pixel gate."""
        if routes_pixels(self.gate):
            return [level.shape[0] * level.shape[-2] * level.shape[-1] for level in x]
        return [level.shape[0] for level in x]

    def mix_pixels(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        """Apply the experts to ``x`` (B, C, H, W) with (B·H·W, N) per-location gate
        weights (a pixel gate's rows) and their (B·H·W, k) ``indices``."""
        gate_map = pixel_map(weights, x.shape)
        c = self.experts[0]
        if self.impl != 'fused' or c.stride != (1, 1) or \
                not same_padding(c.kernel_size, c.padding, c.dilation):
            return pixel_mixture(x, gate_map, self._run_expert)  # checks the map size
        weight = torch.stack([e.weight for e in self.experts])
        bias = torch.stack([e.bias for e in self.experts]) if c.bias is not None else None
        return pixel_conv2d(x, weights, indices, gate_map, weight, bias, c.stride,
                            c.padding, c.dilation, c.groups,
                            routed=not torch.jit.is_tracing())

    def mix(self, x: Tensor, gates: Tensor, indices: Optional[Tensor] = None,
            counts: Optional[Sequence[int]] = None) -> Tensor:
        """Apply the experts to ``x`` (B, ...) with (B, N) gate weights (``indices``:
        the (B, k) experts with non-zero weights, see :func:`mixed_conv2d`;
        ``counts``: the rows per expert read on the host, see :func:`dispatch`)."""
        if self.impl == 'fused':
            convs = list(self.experts)
            bias = (torch.stack([c.bias for c in convs]) if convs[0].bias is not None
                    else None)
            c = convs[0]
            return mixed_conv2d(x, gates, torch.stack([c.weight for c in convs]), bias,
                                c.stride, c.padding, c.dilation, c.groups, indices)
        run = self._run_expert
        return self._dispatch(x, gates, run, counts) if self.impl == 'dispatch' else \
            dense_mixture(x, gates, run)

    def _run_expert(self, n: int, x: Tensor) -> Tensor:
        return self.experts[n](x)

    def forward(self, x: Features, gate_output: Optional[GateOutput] = None
                ) -> Union[Tensor, List[Tensor]]:
        """Route and mix; pass ``gate_output`` to reuse a routing decision
        (e.g. one gate for both the classification and regression branch)."""
        if gate_output is None:
            gate_output = self.route(x)
        pixels = routes_pixels(self.gate)
        if not isinstance(x, (list, tuple)):
            mix = self.mix_pixels if pixels else self.mix
            return mix(x, gate_output.weights, gate_output.indices)
        parts = gate_output.split(self._row_counts(x))
        if pixels:
            return [self.mix_pixels(level, part.weights, part.indices)
                    for level, part in zip(x, parts, strict=True)]
        counts = [None] * len(parts)
        if self.impl == 'dispatch' and not self._capacity_applies():
            # the rows per expert of every level in one host read per step, not per level
            counts = torch.stack([(part.weights > 0).sum(0) for part in parts]).tolist()
        return [self.mix(level, part.weights, part.indices, level_counts)
                for level, part, level_counts in zip(x, parts, counts, strict=True)]

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        """The experts' parameters (k of N experts run per row; see count_parameters)."""
        return self.experts.parameters()

    def extra_repr(self):
        return (f'num_experts={self.num_experts}, top_k={self.top_k}, '
                f'impl={self.impl!r}{self._capacity_repr()}')
