r"""Functional forms of a mixture of conv experts, mixed with per-row gate weights.

All compute ``y_b = Σ_n G_bn · E_n(x_b)`` for gates G (B, N):

- :func:`dispatch`: runs each expert only on the rows routed to it (G_bn > 0);
  works for any (non-linear) experts. :func:`dispatch_with_capacity`: the same
  with a fixed number of rows per expert (no host read; overflow dropped).
- :func:`mixed_conv2d`: for linear conv experts of one geometry,
  ``Σ_n G_bn (W_n ∗ x_b + b_n) = (Σ_n G_bn W_n) ∗ x_b + Σ_n G_bn b_n`` exactly
  (CondConv); one grouped conv with a per-image kernel, cost ≈ one dense conv.
"""
from typing import Callable, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _scale_rows(y: Tensor, row_weights: Tensor) -> Tensor:
    """(B, ...) outputs times (B,) weights, one per row; a row of weight 0 gives 0
    even where the expert overflowed on it (inf · 0 would be NaN)."""
    weights = row_weights.to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
    return torch.where(weights != 0, y * weights, 0)


def _run_routed(x: Tensor, slots: Iterable[Tuple[int, Tensor, Tensor]],
                expert_forward: Callable[[int, Tensor], Tensor]) -> Optional[Tensor]:
    """``Σ`` over ``slots`` (expert n, its rows, their weights) of the weighted expert
    outputs, added at their rows; None when no slot ran."""
    out = None
    for n, rows, weights in slots:
        y = _scale_rows(expert_forward(n, x.index_select(0, rows)), weights)
        if out is None:
            out = y.new_zeros((x.shape[0], *y.shape[1:]))
        elif y.shape[1:] != out.shape[1:]:
            raise ValueError(f'expert {n} returned shape {tuple(y.shape[1:])} per row, '
                             f'other experts {tuple(out.shape[1:])}: experts must agree')
        out = out.index_add(0, rows, y)
    return out


def dispatch(x: Tensor, gates: Tensor, expert_forward: Callable[[int, Tensor], Tensor],
             counts: Optional[Sequence[int]] = None) -> Tensor:
    """Route rows of ``x`` (B, ...) to experts with positive gate weight.

    The (row, expert) pairs are sorted by expert on the device; the rows per expert
    are read on the host (to size each expert's batch), the one host
    synchronisation of a dispatched MoE (:func:`dispatch_with_capacity` has none).

    Args:
        x: (B, ...) inputs.
        gates: (B, N) gate weights.
        expert_forward: ``f(n, x_rows) -> y_rows`` runs expert n.
        counts: the rows per expert, ``(gates > 0).sum(0)``, when the caller has
            read them already (e.g. for all FPN levels at once); None: read here.

    Returns:
        (B, ...) ``Σ_n G_bn · E_n(x_b)``.
    """
    num_rows, num_experts = gates.shape
    routed = (gates > 0).t().reshape(-1)  # expert-major (N·B,)
    if counts is None:
        counts = routed.view(num_experts, num_rows).sum(1).tolist()  # the host read
    # stable: routed pairs first, by expert, then by row
    pairs = torch.argsort((~routed).to(torch.uint8), stable=True)[:sum(counts)]
    slots = ((n, rows - n * num_rows, gates[rows - n * num_rows, n])
             for n, rows in enumerate(pairs.split(counts)) if counts[n])
    out = _run_routed(x, slots, expert_forward)
    return expert_forward(0, x) * 0 if out is None else out  # None: empty batch


def dispatch_with_capacity(x: Tensor, gates: Tensor,
                           expert_forward: Callable[[int, Tensor], Tensor],
                           capacity: int) -> Tuple[Tensor, Tensor]:
    """:func:`dispatch` with ``capacity`` rows per expert fixed in advance (GShard,
    Switch): static shapes, no host read.

    Expert n runs on exactly ``min(capacity, B)`` rows: the first rows routed to it,
    in row order, padded with rows of weight 0 (which add nothing; experts with
    batch statistics, e.g. BatchNorm in training, would see them). Rows routed to an
    expert beyond its capacity are dropped: that expert's term is missing from their
    output. The caller picks the capacity, e.g. ``ceil(factor · B · k / N)``.

    Args:
        x, gates, expert_forward: as :func:`dispatch`.
        capacity: rows per expert, >= 1.

    Returns:
        ``(out, dropped)``: (B, ...) outputs and the number of dropped (row, expert)
        pairs, a 0-dim tensor on the device.

    Example:
        >>> gates = torch.tensor([[.5, .5], [.5, .5], [1., 0.]])
        >>> out, dropped = dispatch_with_capacity(torch.ones(3, 1), gates,
        ...                                       lambda n, rows: rows * (n + 1), 2)
        >>> out.flatten().tolist(), int(dropped)  # row 2 exceeded expert 0's 2 rows
        ([1.5, 1.5, 0.0], 1)
    """
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f'capacity must be an int >= 1 (rows per expert), got {capacity!r}')
    num_rows, num_experts = gates.shape
    capacity = min(capacity, num_rows)
    routed = (gates > 0).t()  # (N, B)
    kept = routed & (routed.cumsum(1) <= capacity)
    dropped = (routed & ~kept).sum()
    # each expert's kept rows first, in row order, then unrouted rows to pad
    rows = torch.argsort((~kept).to(torch.uint8), dim=1, stable=True)[:, :capacity]
    weights = gates.t().gather(1, rows) * kept.gather(1, rows)
    out = _run_routed(x, ((n, rows[n], weights[n]) for n in range(num_experts)),
                      expert_forward)
    return out, dropped


def mixed_conv2d(x: Tensor, gates: Tensor, weight: Tensor, bias: Optional[Tensor],
                 stride=1, padding=0, dilation=1, groups: int = 1,
                 indices: Optional[Tensor] = None) -> Tensor:
    """Per-image mixed-kernel convolution as one grouped conv.

    Args:
        x: (B, C_in, H, W).
        gates: (B, N).
        weight: (N, C_out, C_in / groups, kh, kw).
        bias: (N, C_out) or None.
        indices: (B, k) the experts with non-zero gates per image (a gate's
            ``GateOutput.indices``; it must hold every non-zero gate), or None for
            any gates. Given, and fewer than N (B·k < N), only the selected kernels
            are read and mixed: the mixing costs min(B·k, N) kernels, not N.

    Returns:
        (B, C_out, H', W').
    """
    batch, channels, height, width = x.shape
    out_channels = weight.shape[1]
    tracing = torch.jit.is_tracing()
    if tracing or indices is None or indices.numel() >= weight.shape[0]:
        kernel = torch.einsum('bn,n...->b...', gates.to(weight.dtype), weight)
    else:  # Σ_j g_{b,i_bj} W_{i_bj}: one gather-and-sum, gradients to gates included
        kernel = F.embedding_bag(indices, weight.flatten(1), mode='sum',
                                 per_sample_weights=gates.gather(1, indices).to(weight.dtype))
    if tracing:
        # a graph (ONNX) fixes the batch but not, after a resize, the kernel shape of the
        # grouped conv below; one conv per image keeps every kernel (C_out, C_in, kh, kw)
        y = torch.cat([F.conv2d(image[None], image_kernel, None, stride, padding, dilation,
                                groups)
                       for image, image_kernel in zip(x.unbind(0), kernel.unbind(0))])
    else:
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
