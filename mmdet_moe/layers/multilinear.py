r"""Multilinear Mixture of Experts (μMoE, Oldfield et al., arXiv 2402.12550).

Soft routing over N experts without materialising the N×I×O weight tensor. With
the input extended by a constant 1 (``z̃ = [z, 1]``, the bias row) and gates
``a = act(Norm(z · G))`` (G initialised to zeros, act = entmax15 or softmax):

- CP: ``W = [[U1, U2, U3]]``, ``U1`` (N×R), ``U2`` ((I+1)×R), ``U3`` (O×R), so
  ``y_o = Σ_r U3[o,r] · (Σ_n a_n U1[n,r]) · (Σ_i z̃_i U2[i,r])``.
- TR: cores ``G1`` (r1×N×r2), ``G2`` (r2×(I+1)×r3), ``G3`` (r3×O×r1),
  ``W[n,i,o] = tr(G1[:,n,:] G2[:,i,:] G3[:,o,:])``: contract the gate with G1 and
  the input with G2, multiply the two rank matrices, contract with G3.

Both equal ``y = Σ_n a_n W_nᵀ z̃`` (see ``materialize()``).

Conv form (k×k kernels, our extension): the token at an output pixel is its k×k
input patch, so the input factor is a conv with R (CP) or r2·r3 (TR) output
channels (its bias is the z̃ = 1 row). The gate is per pixel (a 1×1 conv on the
patch centre, ``'pixel'``) or per image (on GAP(x), ``'image'``). Cost ≈ two convs
with R channels, independent of N. The linear forms are the 1×1 case on tokens.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from entmax import entmax15
from torch.nn.modules.utils import _pair

from ._checks import check_choice, check_num_experts
from ._precision import autocast_off, full_dtype
from .base import MoEModuleMixin
from .pixel_routing import same_padding
from .recording import record_gate
from .routing_override import EQUAL_WEIGHTS

GATE_ACTIVATIONS = {'entmax15', 'softmax'}
GATE_NORMS = {'bn', 'ln', None}


def rank_for_params(in_features: int, out_features: int, num_experts: int,
                    kernel_size=1, kind: str = 'cp') -> int:
    r"""Rank that gives a μMoE layer about the parameters of a dense layer.

    Dense: ``I·k·k·O``. CP: ``R·(N + I·k·k + 1 + O) + I·N`` (factors + gate).
    TR with r1 = r2 = r3 = r: ``r²·(N + I·k·k + 1 + O) + I·N``.
    """
    check_choice('kind', kind, {'cp', 'tr'})
    kh, kw = _pair(kernel_size)
    patch = in_features * kh * kw
    budget = patch * out_features - in_features * num_experts
    per_rank = num_experts + patch + 1 + out_features
    if budget < per_rank:
        raise ValueError(f'a dense {in_features}→{out_features} layer has too few '
                         f'parameters for a μMoE with {num_experts} experts')
    return max(1, round(budget / per_rank if kind == 'cp' else math.sqrt(budget / per_rank)))


class _GateNorm(nn.Module):
    """BatchNorm / LayerNorm without affine over the expert dim 1 of (B, N, ...)."""

    def __init__(self, kind: Optional[str], num_experts: int):
        super().__init__()
        self.kind = kind
        if kind == 'bn':
            self.norm = nn.BatchNorm1d(num_experts, affine=False)
        elif kind == 'ln':
            self.norm = nn.LayerNorm(num_experts, elementwise_affine=False)

    def forward(self, logits: Tensor) -> Tensor:
        if self.kind == 'bn':
            stats = self.norm.running_mean
            if stats is not None and stats.dtype != logits.dtype:
                # a model cast to half precision (no autocast): its statistics' dtype
                return self(logits.to(stats.dtype)).to(logits.dtype)
            if not self.norm.training and stats is not None:
                # BatchNorm1d's eval on (B, N, ...) as it is: flattening the map would
                # lose the expert count in a traced graph (ONNX BatchNormalization needs it)
                return F.batch_norm(logits, stats, self.norm.running_var, eps=self.norm.eps)
            return self.norm(logits.flatten(2)).view_as(logits) if logits.dim() > 2 \
                else self.norm(logits)
        if self.kind == 'ln':  # a positive dim: movedim(1, -1) exports as an invalid Transpose
            last = logits.dim() - 1
            return self.norm(logits.movedim(1, last)).movedim(last, 1)
        return logits


class _MuMoEConvBase(MoEModuleMixin, nn.Module):
    """Gating and geometry shared by the CP and TR conv forms."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                 num_experts, gate_mode, gate_act, norm, bias, factor_channels):
        super().__init__()
        check_num_experts(num_experts)
        check_choice('gate_mode', gate_mode, {'pixel', 'image'})
        check_choice('gate_act', gate_act, GATE_ACTIVATIONS)
        check_choice('norm', norm, GATE_NORMS)
        self.in_channels, self.out_channels, self.num_experts = \
            in_channels, out_channels, num_experts
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        # read by mmcv's ConvModule, which exports its conv's geometry
        self.groups, self.transposed, self.output_padding = 1, False, (0, 0)
        self.gate_mode, self.gate_act = gate_mode, gate_act
        if gate_mode == 'pixel' and not same_padding(self.kernel_size, self.padding,
                                                     self.dilation):
            raise ValueError(
                "gate_mode='pixel' gates each output pixel on its patch centre and "
                f'needs "same" padding = dilation·(k−1)/2; got kernel_size='
                f'{self.kernel_size}, padding={self.padding}, dilation={self.dilation}')
        self._init_moe(None)
        self.forced_expert = None  # set by override_routing() for analysis
        self.gate_weight = nn.Parameter(torch.zeros(num_experts, in_channels))
        self.gate_norm = _GateNorm(norm, num_experts)
        self.input_factor = nn.Conv2d(in_channels, factor_channels, kernel_size, stride,
                                      padding, dilation, bias=bias)
        nn.init.normal_(self.input_factor.weight, std=1 / math.sqrt(
            in_channels * self.kernel_size[0] * self.kernel_size[1]))
        if bias:
            nn.init.zeros_(self.input_factor.bias)

    def gate_weights(self, x: Tensor) -> Tensor:
        """Expert weights a: (B, N, H', W') per pixel or (B, N) per image.

        Logits, norm and entmax / softmax run in float32 with autocast off (float64
        for float64 inputs), whatever the activation dtype under mixed precision.
        """
        dtype = full_dtype(x, self.gate_weight)
        with autocast_off(x.device):
            return self._gate_weights(x, self.gate_weight.to(dtype), dtype)

    def _gate_weights(self, x: Tensor, gate_weight: Tensor, dtype: torch.dtype) -> Tensor:
        if self.gate_mode == 'pixel':
            logits = F.conv2d(x.to(dtype), gate_weight[:, :, None, None], stride=self.stride)
        else:
            logits = x.mean(dim=(2, 3), dtype=dtype) @ gate_weight.t()
        logits = self.gate_norm(logits)
        if self.forced_expert == EQUAL_WEIGHTS:
            return torch.full_like(logits, 1.0 / self.num_experts)
        if self.forced_expert is not None:
            forced = torch.full_like(logits[:, 0], self.forced_expert, dtype=torch.long)
            return F.one_hot(forced, self.num_experts).movedim(-1, 1).to(logits.dtype)
        if self.gate_act == 'softmax':
            return F.softmax(logits, dim=1)
        # entmax sorts along the expert dim: a contiguous last dim sorts faster than strided
        # (a positive dim: a negative one exports as an invalid ONNX Transpose)
        last = logits.dim() - 1
        return entmax15(logits.movedim(1, last).contiguous(), dim=last).movedim(last, 1)

    def forward(self, x: Tensor) -> Tensor:
        # sizes are graph values while tracing: a check on them would freeze into it
        if x.dim() != 4 or not torch.jit.is_tracing() and x.shape[1] != self.in_channels:
            raise ValueError(f'{self.moe_name or type(self).__name__}: expected (B, '
                             f'{self.in_channels}, H, W) input, got shape {tuple(x.shape)}; '
                             'a MoE conv stands for an nn.Conv2d on 2-D maps: leave a conv '
                             'fed other shapes dense')
        gates = self.gate_weights(x)
        self._record(gates)
        # contiguous NCHW, as a conv returns it (heads view their outputs)
        return self.combine(gates, self.input_factor(x)).contiguous()

    def _record(self, gates: Tensor) -> None:
        if gates.dim() == 2:
            record_gate(self, gates)
        else:
            record_gate(self, gates.mean(dim=(2, 3)), pixel_weights=gates)

    def materialize(self) -> Tuple[Tensor, Optional[Tensor]]:
        """Full expert kernels (N, O, I, kh, kw) and biases (N, O) (or None)."""
        raise NotImplementedError

    def extra_repr(self):
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
                f'num_experts={self.num_experts}, gate_mode={self.gate_mode!r}, '
                f'gate_act={self.gate_act!r}')


class CPMuMoEConv2d(_MuMoEConvBase):
    """CP-factorised μMoE convolution (see module docstring).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias:
            as ``nn.Conv2d``.
        num_experts: N (hundreds are cheap).
        rank: CP rank R; default matches a dense conv's parameter count.
        gate_mode: ``'pixel'`` or ``'image'``.
        gate_act: ``'entmax15'`` or ``'softmax'``.
        norm: ``'bn'``, ``'ln'`` or None on the gate logits.

    Shapes: (B, I, H, W) → (B, O, H', W').
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1,
                 padding=1, dilation=1, num_experts: int = 64, rank: Optional[int] = None,
                 gate_mode: str = 'pixel', gate_act: str = 'entmax15',
                 norm: Optional[str] = 'bn', bias: bool = True):
        rank = rank or rank_for_params(in_channels, out_channels, num_experts,
                                       kernel_size, 'cp')
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         num_experts, gate_mode, gate_act, norm, bias, rank)
        self.rank = rank
        # U1 ≈ 1: experts start alike, the noise breaks their symmetry for the gate.
        self.expert_factor = nn.Parameter(1 + 0.1 * torch.randn(num_experts, rank))
        self.output_factor = nn.Parameter(torch.randn(out_channels, rank) /
                                          math.sqrt(3 * rank))

    def combine(self, gates: Tensor, z: Tensor) -> Tensor:
        gates = gates.to(self.expert_factor.dtype)  # autocast casts on to z's dtype
        expert_part = torch.einsum('bn...,nr->br...', gates, self.expert_factor)
        if expert_part.dim() == 2:
            expert_part = expert_part[:, :, None, None]
        return torch.einsum('brhw,or->bohw', z * expert_part, self.output_factor)

    def materialize(self):
        weight = torch.einsum('nr,rikl,or->noikl', self.expert_factor,
                              self.input_factor.weight, self.output_factor)
        bias = None
        if self.input_factor.bias is not None:
            bias = torch.einsum('nr,r,or->no', self.expert_factor, self.input_factor.bias,
                                self.output_factor)
        return weight, bias


class TRMuMoEConv2d(_MuMoEConvBase):
    """Tensor-ring μMoE convolution with ranks (r1, r2, r3) (see module docstring).

    Args: as :class:`CPMuMoEConv2d`, with ``ranks`` instead of ``rank`` (default:
    equal ranks matching a dense conv's parameter count).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1,
                 padding=1, dilation=1, num_experts: int = 64,
                 ranks: Optional[Sequence[int]] = None, gate_mode: str = 'pixel',
                 gate_act: str = 'entmax15', norm: Optional[str] = 'bn', bias: bool = True):
        if ranks is None:
            ranks = (rank_for_params(in_channels, out_channels, num_experts,
                                     kernel_size, 'tr'),) * 3
        if len(ranks) != 3 or min(ranks) < 1:
            raise ValueError(f'ranks must be three ints >= 1, got {ranks!r}')
        r1, r2, r3 = ranks
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         num_experts, gate_mode, gate_act, norm, bias, r2 * r3)
        self.ranks = tuple(ranks)
        eye = torch.eye(r1, r2).unsqueeze(1).expand(r1, num_experts, r2)
        self.expert_core = nn.Parameter(eye + 0.1 * torch.randn(r1, num_experts, r2))
        self.output_core = nn.Parameter(torch.randn(r3, out_channels, r1) /
                                        math.sqrt(3 * min(r1, r2) * r3))
        with torch.no_grad():  # the input core has r2·r3 rows; keep W's scale as dense
            self.input_factor.weight.mul_(1 / math.sqrt(r2))

    def combine(self, gates: Tensor, z: Tensor) -> Tensor:
        r1, r2, r3 = self.ranks
        z = z.view(z.shape[0], r2, r3, *z.shape[-2:])
        gates = gates.to(self.expert_core.dtype)  # autocast casts on to z's dtype
        if gates.dim() == 2:
            expert_part = torch.einsum('bn,anc->bac', gates, self.expert_core)
            mixed = torch.einsum('bac,bcdhw->badhw', expert_part, z)
        else:
            expert_part = torch.einsum('bnhw,anc->bachw', gates, self.expert_core)
            mixed = torch.einsum('bachw,bcdhw->badhw', expert_part, z)
        return torch.einsum('badhw,doa->bohw', mixed, self.output_core)

    def materialize(self):
        r1, r2, r3 = self.ranks
        g2 = self.input_factor.weight.view(r2, r3, self.in_channels, *self.kernel_size)
        weight = torch.einsum('anc,cdikl,doa->noikl', self.expert_core, g2,
                              self.output_core)
        bias = None
        if self.input_factor.bias is not None:
            bias = torch.einsum('anc,cd,doa->no', self.expert_core,
                                self.input_factor.bias.view(r2, r3), self.output_core)
        return weight, bias


class _TokenForm:
    """Linear form: tokens (..., I) → (..., O), the 1×1 conv form on (T, I, 1, 1)."""

    def forward(self, z: Tensor) -> Tensor:
        lead = z.shape[:-1]
        y = super().forward(z.reshape(-1, self.in_channels, 1, 1))
        return y.view(*lead, self.out_channels)

    def materialize(self) -> Tensor:
        """(N, I+1, O) expert matrices W_n (the last input row is the bias)."""
        weight, bias = super().materialize()
        weight = weight[..., 0, 0].transpose(1, 2)
        if bias is None:
            bias = weight.new_zeros(weight.shape[0], weight.shape[2])
        return torch.cat([weight, bias.unsqueeze(1)], dim=1)


class CPMuMoE(_TokenForm, CPMuMoEConv2d):
    """CP μMoE linear layer on tokens (..., in_features) → (..., out_features)."""

    def __init__(self, in_features: int, out_features: int, num_experts: int = 64,
                 rank: Optional[int] = None, gate_act: str = 'entmax15',
                 norm: Optional[str] = 'bn', bias: bool = True):
        super().__init__(in_features, out_features, 1, 1, 0, 1, num_experts, rank,
                         'pixel', gate_act, norm, bias)


class TRMuMoE(_TokenForm, TRMuMoEConv2d):
    """Tensor-ring μMoE linear layer on tokens (..., in_features) → (..., out_features)."""

    def __init__(self, in_features: int, out_features: int, num_experts: int = 64,
                 ranks: Optional[Sequence[int]] = None, gate_act: str = 'entmax15',
                 norm: Optional[str] = 'bn', bias: bool = True):
        super().__init__(in_features, out_features, 1, 1, 0, 1, num_experts, ranks,
                         'pixel', gate_act, norm, bias)
