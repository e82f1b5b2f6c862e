r"""Mixtures of conv experts routed per location (``gate_mode='pixel'`` gates).

All compute ``y[b, :, p] = Σ_n G[b, n, p] · E_n(x)[b, :, p]`` for a gate map G
(B, N, H', W') whose every location keeps k non-zero weights:

- :func:`routed_pixel_conv2d`: single linear conv experts, each run only on the
  locations routed to it: the k×k patches of those locations are gathered from
  the padded input and multiplied by the expert's kernel, so the products cost k
  dense convs whatever N (plus the gathers). Reading how many locations each
  expert got is one host read per call.
- :func:`dense_pixel_conv2d`: every expert on every location as one conv with N·C_out
  channels, then the per-location mix (N dense convs in one GEMM; no host read,
  traceable).
- :func:`pixel_mixture`: any experts (e.g. whole head subnets), each on the whole
  map, mixed per location: N× the cost of one expert. Their receptive fields
  overlap, so running an expert only where it is routed would not save its work.
"""
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def same_padding(kernel_size: Tuple[int, int], padding: Tuple[int, int],
                 dilation: Tuple[int, int]) -> bool:
    """Whether each output location's window is centred on an input location
    (padding = dilation·(k−1)/2): its gate then reads that location."""
    return all(2 * p == d * (k - 1) for k, p, d in zip(kernel_size, padding, dilation))


def gate_input(x: Tensor, stride: Tuple[int, int]) -> Tensor:
    """The window centres of a "same"-padded conv of ``stride``: (B, C, H', W')."""
    return x if tuple(stride) == (1, 1) else x[..., ::stride[0], ::stride[1]]


def _scale_by_map(y: Tensor, gate_map: Tensor) -> Tensor:
    """(B, C, H, W) outputs times a (B, H, W) weight map; weight 0 gives 0 even where
    y overflowed (inf · 0 would be NaN)."""
    weights = gate_map.to(y.dtype)[:, None]
    return torch.where(weights != 0, y * weights, 0)


def pixel_mixture(x: Tensor, gate_map: Tensor,
                  expert_forward: Callable[[int, Tensor], Tensor]) -> Tensor:
    """``Σ_n G[:, n] ⊙ E_n(x)``: every expert on the whole map, mixed per location.

    Args:
        x: the experts' input.
        gate_map: (B, N, H', W') per-location weights, H'×W' the experts' output size.
        expert_forward: ``f(n, x) -> (B, C', H', W')``.
    """
    out = 0
    for n in range(gate_map.shape[1]):
        y = expert_forward(n, x)
        # (while tracing, sizes are graph values: a check on them would freeze into it)
        if not torch.jit.is_tracing() and y.shape[-2:] != gate_map.shape[-2:]:
            raise ValueError(f'expert {n} returned a {tuple(y.shape[-2:])} map for a gate '
                             f'map of {tuple(gate_map.shape[-2:])}: per-location routing '
                             'needs experts that keep the size of the map they are gated on')
        out = out + _scale_by_map(y, gate_map[:, n])
    return out


def dense_pixel_conv2d(x: Tensor, gate_map: Tensor, weight: Tensor, bias: Optional[Tensor],
                       stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """All N conv experts (weight (N, C_out, C_in / groups, kh, kw), bias (N, C_out)) on
    every location, mixed by ``gate_map`` (B, N, H', W')."""
    num_experts, out_channels = weight.shape[:2]
    if groups == 1:  # one GEMM with N·C_out output channels
        y = F.conv2d(x, weight.flatten(0, 1), None if bias is None else bias.flatten(),
                     stride, padding, dilation)
        y = y.view(y.shape[0], num_experts, out_channels, *y.shape[-2:])
        return (y * gate_map.to(y.dtype)[:, :, None]).sum(1)
    return pixel_mixture(x, gate_map, lambda n, rows: F.conv2d(
        rows, weight[n], None if bias is None else bias[n], stride, padding, dilation, groups))


def routed_pixel_conv2d(x: Tensor, weights: Tensor, indices: Tensor, weight: Tensor,
                        bias: Optional[Tensor], stride=(1, 1), padding=(0, 0),
                        dilation=(1, 1)) -> Tensor:
    """Each location through its k conv experts only (``groups=1``).

    Args:
        x: (B, C_in, H, W).
        weights: (B·H'·W', N) gate weights per output location, in (image, row,
            column) order (a pixel gate's rows).
        indices: (B·H'·W', k) the experts with non-zero weights per location.
        weight: (N, C_out, C_in, kh, kw); bias: (N, C_out) or None.

    Returns:
        (B, C_out, H', W'), equal to :func:`dense_pixel_conv2d` with the same gates.

    Example:
        >>> x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 6, 3, 3, 3)
        >>> top, idx = torch.randn(50, 4).topk(2, dim=1)
        >>> g = torch.zeros(50, 4).scatter(1, idx, top.softmax(1))
        >>> y = routed_pixel_conv2d(x, g, idx, w, None, padding=(1, 1))
        >>> gmap = g.view(2, 5, 5, 4).permute(0, 3, 1, 2)
        >>> torch.allclose(y, dense_pixel_conv2d(x, gmap, w, None, 1, 1), atol=1e-5)
        True
    """
    batch, channels = x.shape[:2]
    num_experts, out_channels, _, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    padded = F.pad(x, (pw, pw, ph, ph))
    hp, wp = padded.shape[-2:]
    out_h, out_w = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    pixels = padded.permute(0, 2, 3, 1).reshape(-1, channels)  # (B·Hp·Wp, C_in)
    # row of each output location's window corner, and of each kernel tap from there
    corner = (torch.arange(batch, device=x.device).view(-1, 1, 1) * hp * wp
              + torch.arange(out_h, device=x.device).view(1, -1, 1) * sh * wp
              + torch.arange(out_w, device=x.device).view(1, 1, -1) * sw).reshape(-1)
    taps = (torch.arange(kh, device=x.device).view(-1, 1) * dh * wp
            + torch.arange(kw, device=x.device).view(1, -1) * dw).reshape(-1)
    # (C_out, C_in·kh·kw) views of the experts, no copy of the (N, ...) tensor; one
    # unbind, not kernels[n] per expert: indexing would give every expert a gradient
    # of the whole (N, ...) tensor in backward (cost ∝ N)
    kernels = weight.flatten(2).unbind(0)
    biases = [None] * num_experts if bias is None else bias.unbind(0)
    top_k = indices.shape[1]
    experts = indices.reshape(-1)
    order = torch.argsort(experts, stable=True)  # (location, slot) pairs by expert
    counts = torch.bincount(experts, minlength=num_experts).tolist()  # the host read
    locations = order // top_k
    gate_values = weights.gather(1, indices).reshape(-1)[order]
    parts = []
    for n, rows in enumerate(locations.split(counts)):
        # (locations, taps, C_in) → (locations, C_in·taps), the kernels' layout
        patches = pixels[(corner[rows, None] + taps).reshape(-1)].view(
            len(rows), len(taps), channels)
        patches = patches.transpose(1, 2).reshape(len(rows), len(taps) * channels)
        parts.append(patches @ kernels[n].t() if biases[n] is None
                     else torch.addmm(biases[n], patches, kernels[n].t()))
    mixed = torch.cat(parts)  # the matmuls' dtype (autocast's, under mixed precision)
    mixed = mixed * gate_values[:, None].to(mixed.dtype)
    out = mixed.new_zeros(batch * out_h * out_w, out_channels).index_add(0, locations, mixed)
    # contiguous NCHW, as a conv returns it (heads view their outputs)
    return out.view(batch, out_h, out_w, out_channels).permute(0, 3, 1, 2).contiguous()


def pixel_conv2d(x: Tensor, weights: Tensor, indices: Tensor, gate_map: Tensor,
                 weight: Tensor, bias: Optional[Tensor], stride: Tuple[int, int],
                 padding: Tuple[int, int], dilation: Tuple[int, int], groups: int,
                 routed: bool) -> Tensor:
    """N stacked conv experts mixed per output location by a pixel gate: where
    ``routed`` (and ``groups=1``) each location runs its k experts
    (:func:`routed_pixel_conv2d` of its (B·H'·W', N) ``weights`` and ``indices``),
    else all N as one conv mixed by ``gate_map`` (B, N, H', W'), the same weights
    (:func:`dense_pixel_conv2d`)."""
    if routed and groups == 1:
        return routed_pixel_conv2d(x, weights, indices, weight, bias, stride, padding,
                                   dilation)
    return dense_pixel_conv2d(x, gate_map, weight, bias, stride, padding, dilation, groups)
