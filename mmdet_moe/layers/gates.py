r"""Per-image noisy top-k gates (soft routing decisions) and hard constraints.

A gate looks at a global-average-pooled summary of its input and picks k of N
experts per row (an image, or an (image, FPN level) pair)::

    h = W_g · GAP(x) + b                            clean logits, (B, N)
    h ← h + ε · (softplus(W_n · GAP(x)) + 0.01)    training only, ε ~ N(0, 1)
    G = softmax(KeepTopK(h, k))                     zeros outside the top k

With ``renormalize=False`` the kept experts are weighted by their probability in
the softmax over all N logits instead (Switch Transformer); the weights then sum
to less than 1, and a top-1 gate still gets a gradient from the task loss.

Hard constraints (:class:`RelativeImportanceGate`, :class:`AbsoluteImportanceGate`)
switch over-used experts off (logit −∞ before top-k) instead of adding a loss.
"""
import warnings
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_choice, check_num_experts
from .gate_output import GateOutput


class NonFiniteGateError(ValueError):
    """Gate logits became NaN/Inf (the layer is named in the message)."""


def global_importance(weights: Tensor) -> tuple[Tensor, Tensor]:
    """Importance ``Σ_b G_b`` and row count, summed over all DDP ranks.

    A no-op reduction without an initialised process group, so every rank of a
    distributed run sees the same totals and masks the same experts.
    """
    stats = torch.cat([weights.detach().float().sum(0),
                       weights.new_full((1,), weights.shape[0], dtype=torch.float)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    return stats[:-1], stats[-1]


class TopKGate(nn.Module):
    """Noisy top-k gating on global-average-pooled features.

    Args:
        in_channels: channels C of the input feature map (B, C, H, W).
        num_experts: N >= 2.
        top_k: k in [1, N].
        noisy: add learned Gaussian noise to the logits in training mode.
        gate_type: ``'linear'`` (GAP → linear) or ``'conv'`` (3×3 conv → ReLU →
            GAP → linear), the two gates of Pavlitska et al.
        conv_channels: hidden channels of the ``'conv'`` gate.
        noise_epsilon: floor added to the noise std (keeps Φ in the load loss finite).
        renormalize: ``True`` (the paper): softmax over the k kept logits, the
            weights sum to 1. ``False`` (Switch Transformer): each kept expert
            is weighted by its softmax probability over all N logits. With
            ``top_k=1`` and ``True`` the single weight is always 1, so the gate
            gets no gradient from the task loss (a warning says so); ``False``
            is the usual remedy.

    ``forward(x)`` takes a (B, C, H, W) map, a (B, C) pooled vector, or a list of
    maps (FPN levels) that share this gate; rows of a list are concatenated level
    by level, giving L·B rows. It returns a :class:`GateOutput`.
    """

    def __init__(self, in_channels: int, num_experts: int, top_k: int,
                 noisy: bool = True, gate_type: str = 'linear',
                 conv_channels: int = 64, noise_epsilon: float = 1e-2,
                 renormalize: bool = True):
        super().__init__()
        check_num_experts(num_experts, top_k)
        check_choice('gate_type', gate_type, {'linear', 'conv'})
        check_choice('renormalize', renormalize, {True, False})
        if top_k == 1 and renormalize:
            warnings.warn('TopKGate(top_k=1, renormalize=True): the softmax over one '
                          'kept logit is always 1, so the gate gets no gradient from '
                          'the task loss (only from balance losses); pass '
                          'renormalize=False to weight the chosen expert by its '
                          'softmax probability over all experts (Switch Transformer)',
                          stacklevel=2)
        self.in_channels, self.num_experts, self.top_k = in_channels, num_experts, top_k
        self.renormalize = renormalize
        self.noisy, self.gate_type, self.noise_epsilon = noisy, gate_type, noise_epsilon
        self.moe_name = None  # set by assign_moe_names(); used in error messages
        self.forced_expert = None  # set by override_routing() for analysis
        features = in_channels
        if gate_type == 'conv':
            self.conv = nn.Conv2d(in_channels, conv_channels, 3, padding=1)
            features = conv_channels
        self.w_gate = nn.Linear(features, num_experts)
        if noisy:
            self.w_noise = nn.Linear(features, num_experts)
            nn.init.zeros_(self.w_noise.weight)
            nn.init.zeros_(self.w_noise.bias)

    def pooled_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, C') pooled gate features; (B, C) passes through."""
        if x.dim() == 2:
            if self.gate_type == 'conv':
                raise ValueError("gate_type='conv' needs (B, C, H, W) maps, "
                                 f'got shape {tuple(x.shape)}')
            return x
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'{self._label()}: expected (B, {self.in_channels}, H, W) '
                             f'input, got shape {tuple(x.shape)}')
        if self.gate_type == 'conv':
            x = F.relu(self.conv(x))
        return x.mean(dim=(2, 3))

    def _label(self) -> str:
        return self.moe_name or type(self).__name__

    def forward(self, x: Union[Tensor, Sequence[Tensor]]) -> GateOutput:
        if isinstance(x, (list, tuple)):
            feats = torch.cat([self.pooled_features(level) for level in x])
        else:
            feats = self.pooled_features(x)
        logits = self.w_gate(feats)
        if not torch.isfinite(logits).all():
            raise NonFiniteGateError(
                f'{self._label()}: gate logits are not finite (NaN/Inf) for input '
                f'of shape {tuple(feats.shape)}; check the learning rate and inputs')
        noisy_logits = noise_std = None
        routing = logits
        if self.noisy and self.training:
            noise_std = F.softplus(self.w_noise(feats)) + self.noise_epsilon
            noisy_logits = logits + torch.randn_like(logits) * noise_std
            routing = noisy_logits
        if self.forced_expert is not None:
            indices = logits.new_full((len(logits), 1), self.forced_expert, dtype=torch.long)
            weights = torch.zeros_like(logits).scatter(1, indices, 1.0)
            return GateOutput(weights, indices, logits)
        expert_mask = self.expert_mask() if self.training else None
        if expert_mask is not None:
            routing = routing.masked_fill(expert_mask, float('-inf'))
        top_logits, indices = routing.topk(self.top_k, dim=1)
        if self.renormalize:
            kept = F.softmax(top_logits, dim=1)
        else:  # masked experts have logit -inf, hence probability 0
            kept = F.softmax(routing, dim=1).gather(1, indices)
        weights = torch.zeros_like(routing).scatter(1, indices, kept)
        if self.training:
            self.update_state(weights)
        return GateOutput(weights, indices, logits, noisy_logits, noise_std, expert_mask)

    def expert_mask(self) -> Optional[Tensor]:
        """(N,) bool of experts switched off for the next batch; none by default."""
        return None

    def update_state(self, weights: Tensor) -> None:
        """Hook for hard constraints, called with each training batch's weights."""

    def extra_repr(self):
        return (f'in_channels={self.in_channels}, num_experts={self.num_experts}, '
                f'top_k={self.top_k}, noisy={self.noisy}, gate_type={self.gate_type!r}, '
                f'renormalize={self.renormalize}')


class _HardConstraintGate(TopKGate):
    """A top-k gate that switches off experts whose usage statistic exceeds τ.

    Subclasses define the statistic (buffer ``usage``) and how a batch updates it.
    At most N − k experts are masked (the most over-used ones), so every row can
    still pick k experts. The update uses importance summed over all DDP ranks.
    """

    def __init__(self, in_channels: int, num_experts: int, top_k: int,
                 threshold: float = 0.3, warmup_iters: int = 0, noisy: bool = False,
                 **kwargs):
        super().__init__(in_channels, num_experts, top_k, noisy=noisy, **kwargs)
        if not threshold > 0:
            raise ValueError(f'threshold (tau) must be > 0, got {threshold!r}')
        if not isinstance(warmup_iters, int) or warmup_iters < 0:
            raise ValueError(f'warmup_iters must be an int >= 0, got {warmup_iters!r}')
        self.threshold, self.warmup_iters = float(threshold), warmup_iters
        self.register_buffer('usage', torch.zeros(num_experts))
        self.register_buffer('num_iters', torch.zeros((), dtype=torch.long))

    def overuse(self) -> Tensor:
        """(N,) amount by which each expert exceeds its fair share."""
        raise NotImplementedError

    def expert_mask(self) -> Optional[Tensor]:
        if self.num_iters.item() < self.warmup_iters:
            return None
        overuse = self.overuse()
        mask = overuse > self.threshold
        max_masked = self.num_experts - self.top_k
        if mask.sum() > max_masked:
            keep_on = overuse.topk(self.top_k, largest=False).indices
            mask = torch.ones_like(mask).index_fill(0, keep_on, False)
        return mask if mask.any() else None

    def update_state(self, weights: Tensor) -> None:
        importance, rows = global_importance(weights)
        if not self.renormalize:  # rows sum to less than 1: shares of the gate mass
            rows = importance.sum()
        self.num_iters += 1
        if self.num_iters.item() > self.warmup_iters:
            self.accumulate(importance, rows)

    def accumulate(self, importance: Tensor, rows: Tensor) -> None:
        raise NotImplementedError

    def extra_repr(self):
        return (f'{super().extra_repr()}, threshold={self.threshold}, '
                f'warmup_iters={self.warmup_iters}')


class RelativeImportanceGate(_HardConstraintGate):
    r"""Hard constraint on the running relative importance.

    Per training batch of B rows: ``r_i ← r_i + (Imp_i − B/N) / (B/N)``; experts
    with ``r_i > τ`` get logit −∞ for the next batch. Buffer ``usage`` holds r.
    """

    def overuse(self) -> Tensor:
        return self.usage

    def accumulate(self, importance, rows):
        fair = rows / self.num_experts
        self.usage += (importance - fair) / fair


class AbsoluteImportanceGate(_HardConstraintGate):
    r"""Hard constraint on the running mean of each expert's share of importance.

    ``m_i`` = mean over the batches so far of ``Imp_i / B``; expert i is masked
    while ``m_i − 1/N > τ``. Buffer ``usage`` holds m.
    """

    def overuse(self) -> Tensor:
        return self.usage - 1.0 / self.num_experts

    def accumulate(self, importance, rows):
        updates = self.num_iters - self.warmup_iters
        self.usage += (importance / rows - self.usage) / updates


GATES = {cls.__name__: cls for cls in
         (TopKGate, RelativeImportanceGate, AbsoluteImportanceGate)}


def build_gate(gate_cfg: Optional[dict], in_channels: int, num_experts: int,
               top_k: int) -> TopKGate:
    """Build a gate from ``dict(type='TopKGate' | 'RelativeImportanceGate' | ..., **kw)``."""
    cfg = dict(gate_cfg or {})
    gate_type = cfg.pop('type', 'TopKGate')
    if gate_type not in GATES:
        raise ValueError(f'unknown gate type {gate_type!r} in gate_cfg; '
                         f'choose from {sorted(GATES)}')
    return GATES[gate_type](in_channels, num_experts, top_k, **cfg)
