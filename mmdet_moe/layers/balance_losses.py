r"""Soft constraints: auxiliary losses that push a top-k gate towards balanced use.

Notation: a batch of B gate rows over N experts, dense weights ``G`` (B×N),
importance ``Imp = Σ_b G_b`` (column sums), ``CV²(v) = Var(v) / (Mean(v)² + 1e-10)``
with the unbiased variance.

Every loss is computed in float32 (float64 for float64 gates), with autocast off
when called through :class:`BalanceLosses`: half-precision gate rows are upcast.
"""
import math
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._precision import autocast_off, full_dtype
from .gate_output import GateOutput

EPS = 1e-10


def _full(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` in float32 (or float64): half-precision gate rows are upcast."""
    return None if t is None else t.to(full_dtype(t))


def _weights(gates: Union[Tensor, GateOutput]) -> Tensor:
    return _full(gates.weights if isinstance(gates, GateOutput) else gates)


def cv_squared(values: Tensor) -> Tensor:
    """Squared coefficient of variation ``Var(v) / (Mean(v)² + 1e-10)``; 0 for one value."""
    values = _full(values)
    if values.numel() < 2:
        return values.new_zeros(())
    return values.var() / (values.mean() ** 2 + EPS)


def importance_loss(gates: Union[Tensor, GateOutput]) -> Tensor:
    """``CV²(Imp)``, Imp = column sums of the (B, N) gate weights."""
    return cv_squared(_weights(gates).sum(0))


def kl_uniform_loss(gates: Union[Tensor, GateOutput]) -> Tensor:
    """KL divergence of the batch's expert distribution to uniform.

    ``p = (Imp + 1e-10) / ΣImp``, loss ``Σ_i p_i log(p_i · N)``; 0 when balanced.
    ``ΣImp`` is B when every row sums to 1 (the paper's ``p = (Imp + 1e-10) / B``);
    it keeps p a distribution for gates whose rows sum to less (``renormalize=False``).
    """
    weights = _weights(gates)
    num_experts = weights.shape[1]
    importance = weights.sum(0)
    p = (importance + EPS) / importance.sum().clamp_min(EPS)
    return (p * torch.log(p * num_experts)).sum()


def prob_in_top_k(gate_output: GateOutput) -> Tensor:
    r"""Shazeer et al. (2017) smooth probability that expert i stays in the top-k.

    ``P(x, i) = Φ((h_clean,i − thr_i) / σ_i)`` where ``thr_i`` is the k-th largest
    noisy logit among the *other* experts: the (k+1)-th largest overall if i is in
    the top-k, else the k-th largest (this is ``kth_excluding`` of the paper).

    Experts a hard constraint switched off for a row (``expert_mask``) did not
    compete: the thresholds come from the masked noisy logits, which routed, and a
    masked expert's probability is 0.

    Returns:
        (B, N) probabilities.
    """
    noisy, clean, std = (_full(t) for t in (gate_output.noisy_logits, gate_output.logits,
                                            gate_output.noise_std))
    k, num_experts = gate_output.top_k, gate_output.num_experts
    if k == num_experts:
        # every expert is always selected: its load is deterministic.
        return torch.ones_like(clean)
    mask = gate_output.expert_mask
    if mask is not None:
        noisy = noisy.masked_fill(mask, float('-inf'))
    top = noisy.topk(k + 1, dim=1).values
    thr_if_in, thr_if_out = top[:, k:k + 1], top[:, k - 1:k]
    is_in = noisy > thr_if_in
    # with N − k experts masked the (k+1)-th logit is −∞: the kept experts have no
    # rival. A finite stand-in keeps the backward pass free of 0·∞ = NaN.
    no_rival = torch.isinf(thr_if_in)
    thr_if_in = thr_if_in.masked_fill(no_rival, 0.0)
    # Φ as torch.special.ndtr: torch.distributions.Normal checks its arguments on the host
    prob = torch.where(is_in, torch.special.ndtr((clean - thr_if_in) / std),
                       torch.special.ndtr((clean - thr_if_out) / std))
    prob = prob.masked_fill(is_in & no_rival, 1.0)
    return prob if mask is None else prob.masked_fill(mask, 0.0)


def load_loss(gate_output: GateOutput) -> Tensor:
    """``CV²(load)``, ``load_i = Σ_x P(x, i)`` (see :func:`prob_in_top_k`)."""
    if gate_output.noisy_logits is None or gate_output.noise_std is None:
        raise ValueError('load_loss needs a noisy gate in training mode '
                         '(noisy_logits is None); use noisy=True or another loss')
    return cv_squared(prob_in_top_k(gate_output).sum(0))


def switch_loss(gate_output: GateOutput) -> Tensor:
    r"""Switch/GShard balance loss ``N · Σ_i f_i · P_i``; 1 when perfectly balanced.

    ``f_i`` is the fraction of the B·k routing slots that went to expert i,
    ``P_i`` the batch mean of ``softmax(h_clean)_i`` over all N experts.
    """
    batch, num_experts = gate_output.weights.shape
    counts = torch.zeros(num_experts, device=gate_output.indices.device)
    counts.index_add_(0, gate_output.indices.reshape(-1),
                      torch.ones(gate_output.indices.numel(), device=counts.device))
    fraction = counts / max(gate_output.indices.numel(), 1)
    mean_prob = F.softmax(_full(gate_output.logits), dim=1).mean(0)
    return num_experts * (fraction * mean_prob).sum()


def router_z_loss(logits: Union[Tensor, GateOutput]) -> Tensor:
    """ST-MoE router z-loss ``mean_b (logsumexp_i h_bi)²`` on the clean logits."""
    if isinstance(logits, GateOutput):
        logits = logits.logits
    return torch.logsumexp(_full(logits), dim=1).pow(2).mean()


BALANCE_LOSSES: Dict[str, Callable[[GateOutput], Tensor]] = {
    'importance': importance_loss,
    'kl_uniform': kl_uniform_loss,
    'load': load_loss,
    'switch': switch_loss,
    'z': router_z_loss,
}


class BalanceLosses:
    """Weighted auxiliary losses selected by a config such as ``dict(importance=0.5)``.

    Calling it on a :class:`GateOutput` returns ``{name: weight · loss}``.
    """

    def __init__(self, balance_cfg: Optional[Dict[str, float]] = None, noisy: bool = True):
        balance_cfg = dict(balance_cfg or {})
        for name, weight in balance_cfg.items():
            if name not in BALANCE_LOSSES:
                raise ValueError(f'unknown balance loss {name!r} in balance_cfg; '
                                 f'choose from {sorted(BALANCE_LOSSES)}')
            if not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                    or weight < 0:
                raise ValueError(f'balance_cfg[{name!r}] must be a finite weight >= 0, '
                                 f'got {weight!r}')
        if 'load' in balance_cfg and not noisy:
            raise ValueError("balance_cfg has 'load', which needs a noisy gate; "
                             'set noisy=True in gate_cfg or drop the load loss')
        self.weights = {k: float(v) for k, v in balance_cfg.items() if v > 0}

    def __bool__(self):
        return bool(self.weights)

    def __call__(self, gate_output: GateOutput) -> Dict[str, Tensor]:
        with autocast_off(gate_output.weights.device):  # float32 losses under AMP
            return {name: weight * BALANCE_LOSSES[name](gate_output)
                    for name, weight in self.weights.items()}

    def __repr__(self):
        return f'BalanceLosses({self.weights})'
