r"""Noisy top-k gates (soft routing decisions) and hard constraints.

A gate looks at a global-average-pooled summary of its input and picks k of N
experts per row (an image, or an (image, FPN level) pair)::

    h = W_g · GAP(x) + b                            clean logits, (B, N)
    h ← h + ε · (softplus(W_n · GAP(x)) + 0.01)    training only, ε ~ N(0, 1)
    G = softmax(KeepTopK(h, k))                     zeros outside the top k

The ``gate_type='paper_*'`` gates compute the paper's code instead: its noise std
is ``softplus(W_n · GAP(x) + 0.01)`` with a bias-free, randomly initialised W_n.

With ``gate_mode='pixel'`` the same linear maps act on the feature vector of every
location instead of GAP(x) (a 1×1 conv): a (B, C, H, W) map gives B·H·W rows, in
(image, row, column) order, each routed on its own (Spatial MoE, Dryden & Hoefler
2022). Balance losses and hard constraints then count locations, not images.

With ``renormalize=False`` the kept experts are weighted by their probability in
the softmax over all N logits instead (Switch Transformer); the weights then sum
to less than 1, and a top-1 gate still gets a gradient from the task loss.

Hard constraints (:class:`RelativeImportanceGate`, :class:`AbsoluteImportanceGate`)
switch over-used experts off (logit −∞ before top-k) instead of adding a loss. Given
a list of FPN maps they act as the paper's RetinaNet, which calls its gate once per
level: the mask is computed before, and the statistic updated after, each level.
:class:`EqualWeightGate` is the paper's no-gate baseline (all experts, weight 1/N).
"""
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_choice, check_num_experts
from ._precision import autocast_off, full_dtype, full_precision_linear
from .gate_output import GateOutput
from .routing_override import EQUAL_WEIGHTS


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


# training iterations between two host reads of the gates' non-finite flags
NONFINITE_CHECK_INTERVAL = 50


class TopKGate(nn.Module):
    """Noisy top-k gating on global-average-pooled features.

    Args:
        in_channels: channels C of the input feature map (B, C, H, W).
        num_experts: N >= 2.
        top_k: k in [1, N].
        noisy: add learned Gaussian noise to the logits in training mode.
        gate_type: ``'linear'`` (GAP → linear) or ``'conv'`` (3×3 conv → ReLU →
            GAP → linear), whose noise layer ``W_n`` (with bias) starts at zero,
            or the gates of the paper's RetinaNet code as it computes them:
            ``'paper_simple'`` (``SimpleGate``: ``W·GAP(x) + b``), ``'paper_fc'``
            (``FCGate``: ``W·GAP(ReLU(x)) + b``) and ``'paper_conv'``
            (``ConvGate``: ``W·GAP(conv3×3(x)) + b``, no padding, no activation,
            256 channels); their noise std is ``softplus(W_n·GAP(x) + 0.01)`` on the
            raw input, ``W_n`` bias-free with PyTorch's default init, as the
            paper's ``BaseGatingNetwork``.
        conv_channels: hidden channels of the conv gates (default 64 for
            ``'conv'``, 256 for ``'paper_conv'``).
        noise_epsilon: floor added to the noise std (keeps Φ in the load loss finite).
        gate_mode: ``'image'`` (the paper: one row per map, on GAP(x)) or
            ``'pixel'`` (one row per location, on the location's features; the
            ``'conv'`` gate's padded 3×3 conv keeps the map size, ``'paper_conv'``'s
            unpadded one does not and is refused).
        renormalize: ``True`` (the paper): softmax over the k kept logits, the
            weights sum to 1. ``False`` (Switch Transformer): each kept expert
            is weighted by its softmax probability over all N logits. With
            ``top_k=1`` and ``True`` the single weight is always 1, so the gate
            gets no gradient from the task loss (a warning says so); ``False``
            is the usual remedy.

    ``forward(x)`` takes a (B, C, H, W) map, a (B, C) pooled vector, or a list of
    maps (FPN levels) that share this gate; rows of a list are concatenated level
    by level, giving L·B rows (``'pixel'``: Σ_l B·H_l·W_l). It returns a
    :class:`GateOutput`; :func:`pixel_map` turns a map's pixel rows into (B, N, H, W).

    Mixed precision: a conv gate's conv runs in the activation dtype (autocast), the
    pooled features, logits, noise, softmax and weights in float32 with autocast off
    (float64 for float64 inputs), so a :class:`GateOutput` is never half precision.
    """

    def __init__(self, in_channels: int, num_experts: int, top_k: int,
                 noisy: bool = True, gate_type: str = 'linear',
                 conv_channels: Optional[int] = None, noise_epsilon: float = 1e-2,
                 renormalize: bool = True, gate_mode: str = 'image'):
        super().__init__()
        check_num_experts(num_experts, top_k)
        check_choice('gate_type', gate_type, set(GATE_TYPES))
        check_choice('gate_mode', gate_mode, set(GATE_MODES))
        if gate_mode == 'pixel' and gate_type == 'paper_conv':
            raise ValueError("gate_type='paper_conv' (unpadded 3×3) shrinks the map, so "
                             "gate_mode='pixel' cannot give every location a row; use "
                             "gate_type='conv' (padded) or 'linear'")
        check_choice('renormalize', renormalize, {True, False})
        if top_k == 1 and renormalize:
            warnings.warn('TopKGate(top_k=1, renormalize=True): the softmax over one '
                          'kept logit is always 1, so the gate gets no gradient from '
                          'the task loss (only from balance losses); pass '
                          'renormalize=False to weight the chosen expert by its '
                          'softmax probability over all experts (Switch Transformer)',
                          stacklevel=2)
        self.in_channels, self.num_experts, self.top_k = in_channels, num_experts, top_k
        self.renormalize, self.gate_mode = renormalize, gate_mode
        self.noisy, self.gate_type, self.noise_epsilon = noisy, gate_type, noise_epsilon
        self.moe_name = None  # set by assign_moe_names(); used in error messages
        self.forced_expert = None  # set by override_routing() for analysis
        # training: non-finite logits are flagged on the device and checked every
        # NONFINITE_CHECK_INTERVAL iterations (a check per call would stall a GPU)
        self.register_buffer('_nonfinite', torch.zeros((), dtype=torch.bool),
                             persistent=False)
        # ... and whether the gate's input was, to say where the NaN came from
        self.register_buffer('_nonfinite_input', torch.zeros((), dtype=torch.bool),
                             persistent=False)
        self._unchecked_iters = 0
        if conv_channels is not None and (gate_type not in ('conv', 'paper_conv') or
                                          not isinstance(conv_channels, int) or
                                          conv_channels < 1):
            raise ValueError(f'conv_channels={conv_channels!r}: an int >= 1 for the conv '
                             f"gates ('conv', 'paper_conv'); gate_type={gate_type!r}")
        features = in_channels
        if gate_type in ('conv', 'paper_conv'):
            features = conv_channels or GATE_TYPES[gate_type]
            self.conv = nn.Conv2d(in_channels, features, 3,
                                  padding=1 if gate_type == 'conv' else 0)
        self.w_gate = nn.Linear(features, num_experts)
        if noisy and self._paper:
            self.w_noise = nn.Linear(in_channels, num_experts, bias=False)
        elif noisy:
            # Shazeer et al.'s zero init: at the start every input gets the same
            # noise (std softplus(0) + ε ≈ 0.70), however W_n was drawn
            self.w_noise = nn.Linear(features, num_experts)
            nn.init.zeros_(self.w_noise.weight)
            nn.init.zeros_(self.w_noise.bias)

    @property
    def _paper(self) -> bool:
        return self.gate_type.startswith('paper_')

    def pooled_features(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(B, C, H, W) → pooled features (B, C') of the logits and (B, C'') of the
        noise std; a (B, C) vector passes through (gates on GAP(x) alone). With
        ``gate_mode='pixel'``, one row per location instead: (B·H·W, C'), (B·H·W, C'')."""
        if self.gate_mode == 'pixel' and x.dim() != 4:
            raise ValueError(f"{self._label()}: gate_mode='pixel' routes every location of "
                             f'a (B, C, H, W) map; got shape {tuple(x.shape)} (no spatial '
                             "map: use gate_mode='image')")
        if x.dim() == 2:
            if self.gate_type not in ('linear', 'paper_simple'):
                raise ValueError(f"gate_type={self.gate_type!r} needs (B, C, H, W) maps, "
                                 f'got shape {tuple(x.shape)}')
            return x, x
        # while tracing, sizes are graph values: a check on them would freeze into the graph
        if x.dim() != 4 or not torch.jit.is_tracing() and x.shape[1] != self.in_channels:
            raise ValueError(f'{self._label()}: expected (B, {self.in_channels}, H, W) '
                             f'input, got shape {tuple(x.shape)}')

        def gap(t):  # accumulated and returned in float32 under mixed precision
            if self.gate_mode == 'pixel':  # every location is a row
                return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).to(full_dtype(t))
            return t.mean(dim=(2, 3), dtype=full_dtype(t))
        raw = gap(x)
        if self.gate_type in ('linear', 'paper_simple'):
            return raw, raw
        if self.gate_type == 'conv':
            feats = gap(F.relu(self.conv(x)))
            return feats, feats
        if self.gate_type == 'paper_conv' and not torch.jit.is_tracing() \
                and min(x.shape[-2:]) < 3:
            raise ValueError(f"{self._label()}: gate_type='paper_conv' (3×3, no padding) "
                             f'needs maps of at least 3×3, got {tuple(x.shape[-2:])}; '
                             "use gate_type='conv' (padded) or larger inputs")
        hidden = F.relu(x) if self.gate_type == 'paper_fc' else self.conv(x)
        return gap(hidden), raw

    def noise_std(self, noise_feats: Tensor) -> Tensor:
        """σ = softplus(W_n·f) + ε, or the paper's softplus(W_n·GAP(x) + ε), in
        float32 (see :func:`full_precision_linear`)."""
        hidden = full_precision_linear(self.w_noise, noise_feats)
        with autocast_off(hidden.device):
            if self._paper:
                return F.softplus(hidden + self.noise_epsilon)
            return F.softplus(hidden) + self.noise_epsilon

    def _label(self) -> str:
        return self.moe_name or type(self).__name__

    def forward(self, x: Union[Tensor, Sequence[Tensor]]) -> GateOutput:
        maps = list(x) if isinstance(x, (list, tuple)) else [x]
        pooled = [self.pooled_features(level) for level in maps]
        feats = torch.cat([p[0] for p in pooled])
        logits = full_precision_linear(self.w_gate, feats)  # float32 under autocast
        with autocast_off(logits.device):
            return self._gate(logits, feats, pooled, maps)

    def _gate(self, logits: Tensor, feats: Tensor, pooled: List[Tuple[Tensor, Tensor]],
              maps: List[Tensor]) -> GateOutput:
        """Noise, top-k and weights from the clean logits, with autocast off."""
        if self.training:
            self._nonfinite |= ~torch.isfinite(logits).all()
            self._nonfinite_input |= ~self._input_finite(maps)
        elif not torch.jit.is_tracing() and not torch.isfinite(logits).all():
            # (a traced graph cannot raise: the check would be frozen into it)
            self._raise_nonfinite(f'for input of shape {tuple(feats.shape)}',
                                  bool(self._input_finite(maps)))
        noisy_logits = noise_std = None
        routing = logits
        if self.noisy and self.training:
            noise_std = self.noise_std(torch.cat([p[1] for p in pooled]))
            noisy_logits = logits + torch.randn_like(logits) * noise_std
            routing = noisy_logits
        if self.forced_expert == EQUAL_WEIGHTS:
            indices = torch.arange(self.num_experts, device=logits.device).expand(
                len(logits), -1)
            return GateOutput(torch.full_like(logits, 1.0 / self.num_experts), indices, logits)
        if self.forced_expert is not None:
            indices = logits.new_full((len(logits), 1), self.forced_expert, dtype=torch.long)
            weights = torch.zeros_like(logits).scatter(1, indices, 1.0)
            return GateOutput(weights, indices, logits)
        chunks = self.routing_chunks([p[0].shape[0] for p in pooled])
        weights, indices, masks = zip(*map(self._route, routing.split(chunks)))
        mask = None if masks[0] is None else torch.cat(masks)
        return GateOutput(torch.cat(weights), torch.cat(indices), logits, noisy_logits,
                          noise_std, mask)

    @staticmethod
    def _input_finite(maps: List[Tensor]) -> Tensor:
        """Whether every input map is finite, as a device bool (no host read)."""
        return torch.stack([torch.isfinite(m).all() for m in maps]).all()

    def _raise_nonfinite(self, when: str, input_finite: bool) -> None:
        cause = ("its input is finite, so the gate's own weights diverged: check the "
                 'learning rate') if input_finite else (
            'its input features are not finite, so the layers before it produce NaN/Inf '
            '(e.g. parameters never initialised)')
        raise NonFiniteGateError(f'{self._label()}: gate logits are not finite (NaN/Inf) '
                                 f'{when}: {cause}')

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteGateError` if a training forward since the last check
        had non-finite logits (one host read)."""
        self._unchecked_iters = 0
        if self._nonfinite:
            input_finite = not bool(self._nonfinite_input)
            self._nonfinite.zero_()
            self._nonfinite_input.zero_()
            self._raise_nonfinite('in a training step', input_finite)

    def routing_chunks(self, level_sizes: List[int]) -> List[int]:
        """Row counts routed one after the other: one top-k over all rows here (a
        stateless gate routes each row on its own)."""
        return [sum(level_sizes)]

    def _route(self, routing: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Top-k of one chunk of rows: (weights, indices, per-row expert mask)."""
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
        if expert_mask is not None:
            expert_mask = expert_mask.expand_as(routing)
        return weights, indices, expert_mask

    def expert_mask(self) -> Optional[Tensor]:
        """(N,) bool of experts switched off for the next rows; none by default."""
        return None

    def update_state(self, weights: Tensor) -> None:
        """Hook for hard constraints, called with each routed chunk's weights."""

    def end_iteration(self) -> None:
        """Called once at the end of a training iteration: checks the logits every
        NONFINITE_CHECK_INTERVAL iterations (hard constraints also count iterations)."""
        self._unchecked_iters += 1
        if self._unchecked_iters >= NONFINITE_CHECK_INTERVAL:
            self.check_finite()

    def extra_repr(self):
        return (f'in_channels={self.in_channels}, num_experts={self.num_experts}, '
                f'top_k={self.top_k}, noisy={self.noisy}, gate_type={self.gate_type!r}, '
                f'renormalize={self.renormalize}, gate_mode={self.gate_mode!r}')


class _HardConstraintGate(TopKGate):
    """A top-k gate that switches off experts whose usage statistic exceeds τ.

    Subclasses define the statistic (buffer ``usage``) and how routed rows update
    it. At most N − k experts are masked (the most over-used ones), so every row can
    still pick k experts. The update uses importance summed over all DDP ranks.

    Args:
        threshold: τ.
        warmup_iters: training iterations (not gate calls) without mask or update;
            an iteration ends with :meth:`end_iteration`, which mmdet detectors call
            at the end of ``loss()`` (a loop of your own calls
            :func:`end_iteration` on the model).
        level_updates: given a list of FPN maps, ``'sequential'`` (the paper's
            RetinaNet, whose gate is called once per level): the mask is computed
            before and the statistic updated after each level, B rows each;
            ``'joint'``: one mask and one update for the rows of all levels.
        Other arguments: as :class:`TopKGate` (``noisy`` defaults to False here).

    The mask is computed on the device, without host synchronisation.
    """

    def __init__(self, in_channels: int, num_experts: int, top_k: int,
                 threshold: float = 0.3, warmup_iters: int = 0, noisy: bool = False,
                 level_updates: str = 'sequential', **kwargs):
        super().__init__(in_channels, num_experts, top_k, noisy=noisy, **kwargs)
        if not threshold > 0:
            raise ValueError(f'threshold (tau) must be > 0, got {threshold!r}')
        if not isinstance(warmup_iters, int) or warmup_iters < 0:
            raise ValueError(f'warmup_iters must be an int >= 0, got {warmup_iters!r}')
        check_choice('level_updates', level_updates, {'sequential', 'joint'})
        self.threshold, self.warmup_iters = float(threshold), warmup_iters
        self.level_updates = level_updates
        self.register_buffer('usage', torch.zeros(num_experts))
        self.register_buffer('num_iters', torch.zeros((), dtype=torch.long))
        self.register_buffer('num_updates', torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before num_updates existed counted updates in num_iters
        if prefix + 'num_iters' in state_dict and prefix + 'num_updates' not in state_dict:
            state_dict[prefix + 'num_updates'] = (
                state_dict[prefix + 'num_iters'] - self.warmup_iters).clamp_min(0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def routing_chunks(self, level_sizes: List[int]) -> List[int]:
        return list(level_sizes) if self.level_updates == 'sequential' else [sum(level_sizes)]

    def overuse(self) -> Tensor:
        """(N,) amount by which each expert exceeds its fair share."""
        raise NotImplementedError

    def warmed_up(self) -> Tensor:
        return self.num_iters >= self.warmup_iters

    def expert_mask(self) -> Tensor:
        overuse = self.overuse()
        # only the N − k most over-used experts may be switched off
        rank = overuse.argsort(descending=True).argsort()
        return (overuse > self.threshold) & (rank < self.num_experts - self.top_k) & \
            self.warmed_up()

    def update_state(self, weights: Tensor) -> None:
        importance, rows = global_importance(weights)
        if not self.renormalize:  # rows sum to less than 1: shares of the gate mass
            rows = importance.sum()
        active = self.warmed_up()
        self.num_updates += active.long()
        self.usage.copy_(torch.where(active, self.updated_usage(importance, rows),
                                     self.usage))

    def updated_usage(self, importance: Tensor, rows: Tensor) -> Tensor:
        raise NotImplementedError

    def end_iteration(self) -> None:
        super().end_iteration()
        self.num_iters += 1

    def extra_repr(self):
        return (f'{super().extra_repr()}, threshold={self.threshold}, '
                f'warmup_iters={self.warmup_iters}, level_updates={self.level_updates!r}')


class RelativeImportanceGate(_HardConstraintGate):
    r"""Hard constraint on the running relative importance.

    Per update with B rows: ``r_i ← r_i + (Imp_i − B/N) / (B/N)``; experts with
    ``r_i > τ`` get logit −∞ for the next rows. Buffer ``usage`` holds r.
    """

    def overuse(self) -> Tensor:
        return self.usage

    def updated_usage(self, importance, rows):
        fair = rows / self.num_experts
        return self.usage + (importance - fair) / fair


class AbsoluteImportanceGate(_HardConstraintGate):
    r"""Hard constraint on the running mean of each expert's share of importance.

    ``m_i`` = mean over the updates so far of ``Imp_i / B``; expert i is masked
    while ``m_i − 1/N > τ``. Buffer ``usage`` holds m.
    """

    def overuse(self) -> Tensor:
        return self.usage - 1.0 / self.num_experts

    def updated_usage(self, importance, rows):
        return self.usage + (importance / rows - self.usage) / self.num_updates.clamp_min(1)


class EqualWeightGate(nn.Module):
    """The paper's baseline without a gate: every expert on every row, weight 1/N.

    Args:
        in_channels: unused (the gate interface).
        num_experts: N.
        top_k: must be N (every expert runs), or None.
    """
    noisy = False
    renormalize = True
    fixed_top_k = True  # override_routing(top_k=...) cannot change it

    def __init__(self, in_channels: int, num_experts: int, top_k: Optional[int] = None):
        super().__init__()
        check_num_experts(num_experts)
        if top_k not in (None, num_experts):
            raise ValueError(f'EqualWeightGate runs every expert: top_k must be '
                             f'num_experts={num_experts}, got {top_k!r}')
        self.in_channels, self.num_experts, self.top_k = in_channels, num_experts, num_experts
        self.moe_name = None
        self.forced_expert = None  # set by override_routing() for analysis

    def forward(self, x: Union[Tensor, Sequence[Tensor]]) -> GateOutput:
        maps = list(x) if isinstance(x, (list, tuple)) else [x]
        rows = sum(level.shape[0] for level in maps)
        logits = maps[0].new_zeros(rows, self.num_experts, dtype=full_dtype(maps[0]))
        if self.forced_expert is not None and self.forced_expert != EQUAL_WEIGHTS:
            indices = logits.new_full((rows, 1), self.forced_expert, dtype=torch.long)
            return GateOutput(logits.scatter(1, indices, 1.0), indices, logits)
        indices = torch.arange(self.num_experts, device=logits.device).expand(rows, -1)
        return GateOutput(logits + 1.0 / self.num_experts, indices, logits)

    def extra_repr(self):
        return f'num_experts={self.num_experts} (equal weights, no gate)'


def end_iteration(model: nn.Module) -> None:
    """End a training iteration for every gate in ``model`` (hard constraints count
    their warm-up in iterations). mmdet detectors call it at the end of ``loss()``."""
    for module in model.modules():
        if isinstance(module, TopKGate):
            module.end_iteration()


def pixel_map(rows: Tensor, shape: Sequence[int]) -> Tensor:
    """(B·H·W, N) rows of a ``gate_mode='pixel'`` gate → (B, N, H, W) for a map of
    ``shape`` (B, _, H, W)."""
    batch, height, width = shape[0], shape[-2], shape[-1]
    return rows.reshape(batch, height, width, -1).permute(0, 3, 1, 2)


def routes_pixels(module: Optional[nn.Module]) -> bool:
    """Whether ``module`` gives every location its own gate row: a gate, a MoE layer
    holding one (``.gate``) or a μMoE layer, which gates itself (``gate_mode``)."""
    return getattr(getattr(module, 'gate', module), 'gate_mode', 'image') == 'pixel'


GATE_MODES = ('image', 'pixel')
GATE_TYPES = {'linear': None, 'conv': 64, 'paper_simple': None, 'paper_fc': None,
              'paper_conv': 256}
GATES = {cls.__name__: cls for cls in
         (TopKGate, RelativeImportanceGate, AbsoluteImportanceGate, EqualWeightGate)}


def build_gate(gate_cfg: Optional[dict], in_channels: int, num_experts: int,
               top_k: int) -> nn.Module:
    """Build a gate from ``dict(type='TopKGate' | 'RelativeImportanceGate' | ..., **kw)``."""
    cfg = dict(gate_cfg or {})
    gate_type = cfg.pop('type', 'TopKGate')
    if gate_type not in GATES:
        raise ValueError(f'unknown gate type {gate_type!r} in gate_cfg; '
                         f'choose from {sorted(GATES)}')
    return GATES[gate_type](in_channels, num_experts, top_k, **cfg)
