"""Bookkeeping shared by every MoE module: naming, auxiliary losses, gate recording."""
import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ._checks import check_capacity_factor
from .balance_losses import BalanceLosses
from .conv_ops import dispatch, dispatch_with_capacity
from .gate_output import GateOutput
from .gates import pixel_map
from .recording import record_gate

# A module that computes balance losses nobody collects would hold every step's
# graph; past this many uncollected training calls we stop with an error.
MAX_UNCOLLECTED_CALLS = 256


class MoEModuleMixin:
    """Mixin for MoE modules (place it before ``nn.Module`` in the bases).

    Training-mode forwards accumulate their :class:`GateOutput` s; the balance
    losses are computed over all rows accumulated since the last collection, so a
    module called once per FPN level is balanced over all levels together.
    :meth:`aux_losses` returns them; the next training forward starts afresh.
    """
    is_moe_module = True

    def _init_moe(self, balance_cfg: Optional[dict], noisy: bool = True,
                  capacity_factor: Optional[float] = None) -> None:
        self.moe_name: Optional[str] = None
        self.balance_losses = BalanceLosses(balance_cfg, noisy=noisy)
        # training forwards keep their GateOutputs for a loss of the caller's (e.g.
        # routing supervised by a head) even without balance losses
        self.keep_gate_outputs = False
        self._gate_outputs: List[GateOutput] = []
        self._collected = False
        check_capacity_factor(capacity_factor)
        self.capacity_factor = capacity_factor
        self._overflow: Optional[Tensor] = None

    def _dispatch(self, x: Tensor, gates: Tensor,
                  expert_forward: Callable[[int, Tensor], Tensor],
                  counts: Optional[Sequence[int]] = None) -> Tensor:
        """Run the experts on their routed rows (:func:`dispatch`). With a
        ``capacity_factor`` f, in training, each expert takes ``min(ceil(f · B · k /
        N), B)`` rows (:func:`dispatch_with_capacity`: no host read; the overflow is
        dropped and counted, see :meth:`pop_overflow`); in eval every routed row runs.
        ``counts``: see :func:`dispatch`."""
        if not self._capacity_applies():
            return dispatch(x, gates, expert_forward, counts)
        num_rows, num_experts = gates.shape
        capacity = max(1, math.ceil(self.capacity_factor * num_rows * self.top_k / num_experts))
        out, dropped = dispatch_with_capacity(x, gates, expert_forward, capacity)
        counts = torch.stack([dropped, (gates > 0).sum()])
        self._overflow = counts if self._overflow is None else self._overflow + counts
        return out

    def _capacity_applies(self) -> bool:
        return self.capacity_factor is not None and self.training

    def _capacity_repr(self) -> str:
        return '' if self.capacity_factor is None else f', capacity_factor={self.capacity_factor}'

    def pop_overflow(self) -> Optional[Tensor]:
        """(dropped, routed) (row, expert) pairs of capacity dispatch since the last
        call, summed on the device (read it when logging); None if none ran."""
        overflow, self._overflow = self._overflow, None
        return overflow

    def _track(self, gate_output: GateOutput,
               level_sizes: Optional[Sequence[int]] = None,
               pixel_shapes: Optional[Sequence[Sequence[int]]] = None) -> None:
        """Record the gate weights (if a recorder is active) and keep them for the losses.

        ``level_sizes``: row counts per FPN level when the rows stack several levels.
        ``pixel_shapes``: the (B, C, H, W) shape of each map a ``gate_mode='pixel'``
        gate routed (one per level when ``level_sizes`` is given, else one); its
        records then carry the (B, N, H, W) maps and their per-image means.
        """
        if pixel_shapes is not None:
            sizes = [s[0] * s[-2] * s[-1] for s in pixel_shapes]
            parts = gate_output.weights.split(sizes)
            for level, (part, shape) in enumerate(zip(parts, pixel_shapes, strict=True)):
                gate_map = pixel_map(part, shape)
                record_gate(self, gate_map.mean(dim=(2, 3)),
                            None if level_sizes is None else level, pixel_weights=gate_map)
        elif level_sizes is None:
            record_gate(self, gate_output.weights)
        else:
            for level, part in enumerate(gate_output.weights.split(list(level_sizes))):
                record_gate(self, part, level)
        if not (self.training and (self.balance_losses or self.keep_gate_outputs)
                and torch.is_grad_enabled()):
            return
        if self._collected:
            self._gate_outputs.clear()
            self._collected = False
        self._gate_outputs.append(gate_output)
        if len(self._gate_outputs) > MAX_UNCOLLECTED_CALLS:
            raise RuntimeError(
                f'{self.moe_name or type(self).__name__}: {len(self._gate_outputs)} '
                'training forwards without collecting the balance losses. An mmdet '
                "detector collects them in forward(..., mode='loss') (the runner's "
                'path); a loop of your own must call '
                'mmdet_moe.models.collect_moe_losses(model) or aux_losses() each step '
                '(or set balance_cfg=None)')

    def gate_outputs(self) -> Optional[GateOutput]:
        """The rows of the training forward(s) since the last collection, concatenated
        (kept with balance losses or ``keep_gate_outputs``), or None."""
        return GateOutput.cat(self._gate_outputs) if self._gate_outputs else None

    def aux_losses(self) -> Dict[str, Tensor]:
        """Weighted balance losses ``{name: scalar}`` of the last training forward(s)."""
        if not self._gate_outputs:
            return {}
        self._collected = True
        return self.balance_losses(GateOutput.cat(self._gate_outputs))

    def pop_aux_losses(self) -> Dict[str, Tensor]:
        """:meth:`aux_losses`, then forget the rows (a detector collects them once)."""
        losses = self.aux_losses()
        self._gate_outputs.clear()
        return losses
