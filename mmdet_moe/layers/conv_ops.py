r"""Functional forms of a mixture of conv experts, mixed with per-row gate weights.

All compute ``y_b = Σ_n G_bn · E_n(x_b)`` for gates G (B, N):

- :func:`dispatch`: runs each expert only on the rows routed to it (G_bn > 0);
  works for any (non-linear) experts.
- :func:`mixed_conv2d`: for linear conv experts of one geometry,
  ``Σ_n G_bn (W_n ∗ x_b + b_n) = (Σ_n G_bn W_n) ∗ x_b + Σ_n G_bn b_n`` exactly
  (CondConv); one grouped conv with a per-image kernel, cost ≈ one dense conv.
"""
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _scale_rows(y: Tensor, row_weights: Tensor) -> Tensor:
    """(B, ...) outputs times (B,) weights, one per row."""
    return y * row_weights.to(y.dtype).view(-1, *([1] * (y.dim() - 1)))


def dispatch(x: Tensor, gates: Tensor,
             expert_forward: Callable[[int, Tensor], Tensor]) -> Tensor:
    """Route rows of ``x`` (B, ...) to experts with positive gate weight.

    The (row, expert) pairs are sorted by expert on the device; the rows per expert
    are read on the host once per call (to size each expert's batch), the one host
    synchronisation of a dispatched MoE.

    Args:
        x: (B, ...) inputs.
        gates: (B, N) gate weights.
        expert_forward: ``f(n, x_rows) -> y_rows`` runs expert n.

    Returns:
        (B, ...) ``Σ_n G_bn · E_n(x_b)``.
    """
    num_rows, num_experts = gates.shape
    routed = (gates > 0).t().reshape(-1)  # expert-major (N·B,)
    counts = routed.view(num_experts, num_rows).sum(1).tolist()  # the host read
    # stable: routed pairs first, by expert, then by row
    pairs = torch.argsort((~routed).to(torch.uint8), stable=True)[:sum(counts)]
    out = None
    for n, rows in enumerate(pairs.split(counts)):
        if not counts[n]:
            continue
        rows = rows - n * num_rows
        y = expert_forward(n, x.index_select(0, rows))
        y = _scale_rows(y, gates[rows, n])
        if out is None:
            out = y.new_zeros((x.shape[0], *y.shape[1:]))
        elif y.shape[1:] != out.shape[1:]:
            raise ValueError(f'expert {n} returned shape {tuple(y.shape[1:])} per row, '
                             f'other experts {tuple(out.shape[1:])}: experts must agree')
        out = out.index_add(0, rows, y)
    if out is None:  # empty batch
        out = expert_forward(0, x) * 0
    return out


def mixed_conv2d(x: Tensor, gates: Tensor, weight: Tensor, bias: Optional[Tensor],
                 stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """Per-image mixed-kernel convolution as one grouped conv.

    Args:
        x: (B, C_in, H, W).
        gates: (B, N).
        weight: (N, C_out, C_in / groups, kh, kw).
        bias: (N, C_out) or None.

    Returns:
        (B, C_out, H', W').
    """
    batch, channels, height, width = x.shape
    out_channels = weight.shape[1]
    kernel = torch.einsum('bn,n...->b...', gates.to(weight.dtype), weight)
    y = F.conv2d(x.reshape(1, batch * channels, height, width),
                 kernel.reshape(batch * out_channels, *weight.shape[2:]), None,
                 stride, padding, dilation, groups * batch)
    y = y.view(batch, out_channels, *y.shape[-2:])
    if bias is not None:
        y = y + (gates.to(bias.dtype) @ bias)[:, :, None, None]
    return y


def dense_mixture(x: Tensor, gates: Tensor,
                  expert_forward: Callable[[int, Tensor], Tensor]) -> Tensor:
    """Reference: run every expert on every row and mix (N× the cost)."""
    out = 0
    for n in range(gates.shape[1]):
        y = expert_forward(n, x)
        out = out + _scale_rows(y, gates[:, n])
    return out
