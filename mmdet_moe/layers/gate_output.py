"""The routing decision of a top-k gate for one batch of inputs."""
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

# every field has one row per gate row
ROW_FIELDS = ('weights', 'indices', 'logits', 'noisy_logits', 'noise_std', 'expert_mask')


@dataclass
class GateOutput:
    """What a :class:`~mmdet_moe.layers.TopKGate` decided for a batch.

    Attributes:
        weights: (B, N) dense gate weights; zero for unselected experts; each row
            sums to 1 (softmax over the k kept logits), or less with a gate's
            ``renormalize=False`` (probabilities of the softmax over all N).
        indices: (B, k) selected experts, the largest weight first.
        logits: (B, N) clean logits ``h = W_g · GAP(x) + b`` (no noise, no mask).
        noisy_logits: (B, N) ``h + ε · σ`` when noise was applied (training with
            ``noisy=True``), else ``None``.
        noise_std: (B, N) ``σ = softplus(W_n · GAP(x)) + noise_epsilon`` or ``None``.
        expert_mask: (B, N) bool, the experts a hard constraint had switched off
            when each row was routed, or ``None``.
    """
    weights: Tensor
    indices: Tensor
    logits: Tensor
    noisy_logits: Optional[Tensor] = None
    noise_std: Optional[Tensor] = None
    expert_mask: Optional[Tensor] = None

    @property
    def top_k(self) -> int:
        return self.indices.shape[1]

    @property
    def num_experts(self) -> int:
        return self.weights.shape[1]

    def split(self, sizes: Sequence[int]) -> list['GateOutput']:
        """Split the rows (e.g. per FPN level) into consecutive chunks."""
        def part(t):
            return [None] * len(sizes) if t is None else t.split(list(sizes))
        fields = [part(getattr(self, n)) for n in ROW_FIELDS]
        return [GateOutput(*row) for row in zip(*fields, strict=True)]

    @staticmethod
    def cat(outputs: Sequence['GateOutput']) -> 'GateOutput':
        """Concatenate the rows of several gate calls (e.g. all FPN levels)."""
        if len(outputs) == 1:
            return outputs[0]

        def join(name):
            parts = [getattr(o, name) for o in outputs]
            if any(p is None for p in parts):
                return None
            return torch.cat(parts)
        return GateOutput(*map(join, ROW_FIELDS))
