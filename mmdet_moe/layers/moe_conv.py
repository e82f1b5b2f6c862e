"""MoEConv2d: a convolution whose kernel is a per-image (or per-location) mixture of N
expert kernels."""
from typing import Iterator, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from ._checks import check_capacity_impl, check_choice, check_num_experts, has_zero_padding
from .base import MoEModuleMixin
from .conv_ops import dense_mixture, mixed_conv2d
from .gates import build_gate, pixel_map, routes_pixels
from .pixel_routing import gate_input, pixel_conv2d, same_padding

IMPLS = {'auto', 'fused', 'dispatch', 'dense'}


def copy_with_noise(dense: Tensor, copies: int, noise_std: float) -> Tensor:
    """``copies`` stacked copies of ``dense``, each plus N(0, (noise_std·std(dense))²)."""
    stacked = dense.detach().unsqueeze(0).repeat(copies, *([1] * dense.dim()))
    if noise_std > 0:
        stacked += torch.randn_like(stacked) * noise_std * dense.detach().std()
    return stacked


def noisy_copy(tensor: Tensor, noise_std: float) -> Tensor:
    """One copy of a trained tensor for a new expert: a float tensor of more than one
    value gets noise as in :func:`copy_with_noise`; others (e.g. BN's
    ``num_batches_tracked``) are copied as they are."""
    if torch.is_floating_point(tensor) and tensor.numel() > 1:
        return copy_with_noise(tensor, 1, noise_std)[0]
    return tensor.detach().clone()


class MoEConv2d(MoEModuleMixin, nn.Module):
    r"""Sparsely-gated mixture of N single-conv experts with per-image top-k gates.

    ``y_b = Σ_{n ∈ topk(b)} G_bn · (W_n ∗ x_b + b_n)`` with ``G = gate(x)``
    (see :class:`~mmdet_moe.layers.TopKGate`). With a per-location gate
    (``gate_cfg=dict(gate_mode='pixel')``) every output location p picks its own k
    experts, gated on the input at its window centre:
    ``y_b[p] = Σ_{n ∈ topk(b, p)} G_bnp · (W_n ∗ x_b + b_n)[p]`` ("same" padding only).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            bias: as :class:`torch.nn.Conv2d`, shared by all experts.
        num_experts: N >= 2.
        top_k: experts per image, 1 <= k <= N.
        gate_cfg: gate config, e.g. ``dict(type='TopKGate', noisy=True)`` or
            ``dict(type='RelativeImportanceGate', threshold=0.3)``.
        balance_cfg: auxiliary losses and weights, e.g. ``dict(importance=0.5)``.
        upcycle_noise_std: noise (relative to the dense weights' std) added to each
            expert when a dense conv's weights are loaded into this layer.
        impl: ``'fused'`` (one grouped conv with the mixed kernel, ≈ one dense
            conv), ``'dispatch'`` (each image through its k experts, ≈ k convs),
            ``'dense'`` (all N experts, reference) or ``'auto'`` (= fused, which is
            exact for linear experts and the fastest). Per-location gates:
            ``'dispatch'`` runs each location through its k experts only (gathered
            patches, one host read per call, ``groups=1``), ``'dense'`` all N experts
            everywhere (one conv with N·C_out channels), ``'auto'`` picks dispatch
            (measured faster from N = 2k on, see ``docs/benchmarks.md``), dense where
            every expert runs anyway (k = N), while tracing or with groups > 1;
            ``'fused'`` is refused (a kernel per location is not one conv).
        capacity_factor: with ``impl='dispatch'``, fixed rows per expert in training
            (no host read; overflow dropped and counted), see
            :meth:`~mmdet_moe.layers.MoE`; None: every routed image runs.

    Parameters:
        weight: (N, out_channels, in_channels / groups, kh, kw).
        bias: (N, out_channels) or None.

    Shapes: (B, C_in, H, W) → (B, C_out, H', W') as the equivalent ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size,
                 stride=1, padding=0, dilation=1, groups: int = 1, bias: bool = True,
                 num_experts: int = 4, top_k: int = 2, gate_cfg: Optional[dict] = None,
                 balance_cfg: Optional[dict] = None, impl: str = 'auto',
                 upcycle_noise_std: float = 0.0, capacity_factor: Optional[float] = None):
        super().__init__()
        check_num_experts(num_experts, top_k)
        check_choice('impl', impl, IMPLS)
        check_capacity_impl(capacity_factor, impl)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f'in_channels={in_channels} and out_channels={out_channels} '
                             f'must be divisible by groups={groups}')
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.groups, self.num_experts, self.top_k, self.impl = groups, num_experts, top_k, impl
        # read by mmcv's ConvModule, which exports its conv's geometry
        self.transposed, self.output_padding = False, (0, 0)
        if upcycle_noise_std < 0:
            raise ValueError(f'upcycle_noise_std must be >= 0, got {upcycle_noise_std!r}')
        self.upcycle_noise_std = upcycle_noise_std
        self.gate = build_gate(gate_cfg, in_channels, num_experts, top_k)
        if routes_pixels(self.gate):
            self._check_pixel_routing(impl, capacity_factor)
        self._init_moe(balance_cfg, noisy=self.gate.noisy, capacity_factor=capacity_factor)
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels,
                                               in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None
        self.reset_parameters()

    def _check_pixel_routing(self, impl: str, capacity_factor: Optional[float]) -> None:
        if not same_padding(self.kernel_size, self.padding, self.dilation):
            raise ValueError(
                "gate_mode='pixel' gates each output location on its window centre and "
                f'needs "same" padding = dilation·(k−1)/2; got kernel_size={self.kernel_size}, '
                f'padding={self.padding}, dilation={self.dilation}')
        if impl == 'fused':
            raise ValueError("impl='fused' mixes one kernel per image; with "
                             "gate_mode='pixel' use 'auto', 'dispatch' or 'dense'")
        if capacity_factor is not None:
            raise ValueError(f'capacity_factor={capacity_factor!r} caps images per expert; '
                             "gate_mode='pixel' routes locations: leave it None")

    def init_weights(self) -> None:
        """Nothing: the experts keep their initialisation. Its presence tells mmcv's
        ``ConvModule`` not to apply ``kaiming_init`` to the 5-D expert tensor (whose
        fans it would get wrong), and a parent's ``init_weights`` calling it does not
        undo that parent's ``init_cfg`` (which reaches every expert, see :meth:`apply`)."""

    def expert_convs(self) -> List[nn.Conv2d]:
        """Each expert as an ``nn.Conv2d`` whose weight and bias share storage with
        expert n's slice of this layer's tensors: writing into it (e.g. an
        initialiser) writes into that expert. Not registered: no parameters added."""
        convs = []
        for n in range(self.num_experts):
            conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size,
                             self.stride, self.padding, self.dilation, self.groups,
                             bias=self.bias is not None, device='meta')
            conv.weight = nn.Parameter(self.weight.data[n], requires_grad=False)
            if self.bias is not None:
                conv.bias = nn.Parameter(self.bias.data[n], requires_grad=False)
            convs.append(conv)
        return convs

    def apply(self, fn):
        """:meth:`nn.Module.apply`, and ``fn`` on every expert as an ``nn.Conv2d``
        (:meth:`expert_convs`) first. mmengine's initialisers (``init_cfg`` with
        ``layer='Conv2d'``) work through ``apply``: each expert is then initialised
        exactly as the dense conv it replaces, with that conv's fan-in and fan-out.
        ``fn`` acts through the stand-ins' storage: writing into their tensors works,
        replacing them (``conv.weight = ...``) has no effect on this layer."""
        for conv in self.expert_convs():
            fn(conv)
        return super().apply(fn)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Upcycling: a dense conv's (out, in, kh, kw) weight / (out,) bias at this
        # module's keys (e.g. a stock checkpoint) becomes N copies of it.
        for name in ('weight', 'bias'):
            key, param = prefix + name, getattr(self, name)
            if param is not None and key in state_dict \
                    and tuple(state_dict[key].shape) == tuple(param.shape[1:]):
                state_dict[key] = copy_with_noise(state_dict[key], self.num_experts,
                                                  self.upcycle_noise_std)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_parameters(self) -> None:
        """Each expert initialised like a fresh ``nn.Conv2d`` (by its own code)."""
        for conv in self.expert_convs():
            conv.reset_parameters()

    @classmethod
    def like(cls, conv: nn.Conv2d, **kwargs) -> 'MoEConv2d':
        """A freshly initialised MoE layer with the geometry of ``conv``."""
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f'needs an nn.Conv2d, got {type(conv).__name__}')
        if not has_zero_padding(conv):
            raise ValueError(f'supports numeric zero padding only, got '
                             f'padding={conv.padding!r}, padding_mode={conv.padding_mode!r}')
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                   conv.padding, conv.dilation, conv.groups, conv.bias is not None, **kwargs)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, num_experts: int = 4, top_k: int = 2,
                   noise_std: float = 0.0, **kwargs) -> 'MoEConv2d':
        """Upcycle a dense conv: every expert starts as a copy of it.

        With ``noise_std = 0`` the layer reproduces the dense conv exactly (the gate
        weights sum to 1); otherwise each expert gets Gaussian noise of
        ``noise_std × std(dense weight)``.
        """
        moe = cls.like(conv, num_experts=num_experts, top_k=top_k, **kwargs)
        moe.to(conv.weight.device, conv.weight.dtype)
        moe.upcycle_noise_std = noise_std
        missing, unexpected = moe.load_state_dict(conv.state_dict(), strict=False)
        assert not unexpected and all(k.startswith('gate.') for k in missing)
        return moe

    def expert_forward(self, n: int, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias[n]
        return F.conv2d(x, self.weight[n], bias, self.stride, self.padding,
                        self.dilation, self.groups)

    def mix(self, x: Tensor, gates: Tensor, impl: Optional[str] = None,
            indices: Optional[Tensor] = None) -> Tensor:
        """Apply the experts to ``x`` with given (B, N) gate weights; ``indices``
        (B, k), the experts with non-zero weights, lets the fused kernel mix only
        those (see :func:`mixed_conv2d`)."""
        impl = impl or self.impl
        if impl in ('fused', 'auto'):
            return mixed_conv2d(x, gates, self.weight, self.bias, self.stride,
                                self.padding, self.dilation, self.groups, indices)
        if impl == 'dispatch':
            # one unbind per call: indexing the (N, ...) weight per expert would
            # allocate a full-size gradient per expert in backward (cost ∝ N)
            weights = self.weight.unbind(0)
            biases = self.bias.unbind(0) if self.bias is not None else [None] * len(weights)
            return self._dispatch(x, gates, lambda n, rows: F.conv2d(
                rows, weights[n], biases[n], self.stride, self.padding, self.dilation,
                self.groups))
        return dense_mixture(x, gates, self.expert_forward)

    def pixel_impl(self) -> str:
        """``'dense'`` or ``'dispatch'``: how :meth:`forward` runs a per-location gate."""
        if self.impl != 'auto':
            return self.impl
        if torch.jit.is_tracing() or self.groups > 1 or self.top_k >= self.num_experts:
            return 'dense'
        return 'dispatch'

    def mix_pixels(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        """Apply the experts to ``x`` with (B·H'·W', N) per-location gate weights
        (a pixel gate's rows) and their (B·H'·W', k) ``indices``."""
        gate_map = pixel_map(weights, gate_input(x, self.stride).shape)
        return pixel_conv2d(x, weights, indices, gate_map, self.weight, self.bias,
                            self.stride, self.padding, self.dilation, self.groups,
                            routed=self.pixel_impl() == 'dispatch')

    def forward(self, x: Tensor) -> Tensor:
        if routes_pixels(self.gate):
            centres = gate_input(x, self.stride)
            gate_output = self.gate(centres)
            self._track(gate_output, pixel_shapes=[centres.shape])
            return self.mix_pixels(x, gate_output.weights, gate_output.indices)
        gate_output = self.gate(x)
        self._track(gate_output)
        return self.mix(x, gate_output.weights, indices=gate_output.indices)

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        """The N experts' kernels and biases (k of them mix per row; see count_parameters)."""
        yield self.weight
        if self.bias is not None:
            yield self.bias

    def extra_repr(self):
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
                f'stride={self.stride}, padding={self.padding}, dilation={self.dilation}, '
                f'groups={self.groups}, bias={self.bias is not None}, '
                f'num_experts={self.num_experts}, top_k={self.top_k}, impl={self.impl!r}'
                f'{self._capacity_repr()}')
