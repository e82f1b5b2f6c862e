"""Bookkeeping shared by every MoE module: naming, auxiliary losses, gate recording."""
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .balance_losses import BalanceLosses
from .gate_output import GateOutput
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

    def _init_moe(self, balance_cfg: Optional[dict], noisy: bool = True) -> None:
        self.moe_name: Optional[str] = None
        self.balance_losses = BalanceLosses(balance_cfg, noisy=noisy)
        self._gate_outputs: List[GateOutput] = []
        self._collected = False

    def _track(self, gate_output: GateOutput,
               level_sizes: Optional[Sequence[int]] = None) -> None:
        """Record the gate weights (if a recorder is active) and keep them for the losses.

        ``level_sizes``: row counts per FPN level when the rows stack several levels.
        """
        if level_sizes is None:
            record_gate(self, gate_output.weights)
        else:
            for level, part in enumerate(gate_output.weights.split(list(level_sizes))):
                record_gate(self, part, level)
        if not (self.training and self.balance_losses and torch.is_grad_enabled()):
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
