import math

import pytest
import torch
from torch.distributions import Normal

from mmdet_moe.layers import (BalanceLosses, GateOutput, importance_loss, kl_uniform_loss,
                              load_loss, prob_in_top_k, router_z_loss, switch_loss)


def gate_output(weights, logits=None, noisy=None, std=None, k=1):
    weights = torch.as_tensor(weights, dtype=torch.float)
    indices = weights.topk(k, dim=1).indices
    logits = weights.clone() if logits is None else torch.as_tensor(logits, dtype=torch.float)
    return GateOutput(weights, indices, logits, noisy, std)


def test_importance_loss_hand_values():
    # Imp = [1, 2, 3]: mean 2, unbiased variance 1 -> CV² = 1/4
    w = torch.tensor([[1., 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]])
    assert importance_loss(w).item() == pytest.approx(0.25)
    # all 4 images on expert 0: Imp = [4, 0, 0, 0], var = 12/3 = 4, mean 1
    one = torch.zeros(4, 4)
    one[:, 0] = 1
    assert importance_loss(one).item() == pytest.approx(4.0)
    # perfectly balanced
    balanced = torch.tensor([[.5, .5, 0, 0], [0, 0, .5, .5]])
    assert importance_loss(balanced).item() == pytest.approx(0.0, abs=1e-12)


def test_kl_uniform_loss_hand_values():
    balanced = torch.tensor([[.5, .5, 0, 0], [0, 0, .5, .5]])
    assert kl_uniform_loss(balanced).item() == pytest.approx(0.0, abs=1e-6)
    one = torch.zeros(4, 4)
    one[:, 0] = 1
    assert kl_uniform_loss(one).item() == pytest.approx(math.log(4), rel=1e-6)
    # Imp = [3, 1] over B = 4: p = [.75, .25], KL = .75 ln 1.5 + .25 ln .5
    w = torch.tensor([[1., 0], [1, 0], [1, 0], [0, 1]])
    expected = .75 * math.log(1.5) + .25 * math.log(.5)
    assert kl_uniform_loss(w).item() == pytest.approx(expected, rel=1e-6)


def brute_force_prob_in_top_k(clean, noisy, std, k):
    """Shazeer's P(x, i) = Φ((clean_i − kth_excluding(noisy, k, i)) / σ_i), literally."""
    out = torch.empty_like(clean)
    for b in range(clean.shape[0]):
        for i in range(clean.shape[1]):
            others = torch.cat([noisy[b, :i], noisy[b, i + 1:]])
            threshold = others.sort(descending=True).values[k - 1]
            out[b, i] = Normal(0., 1.).cdf((clean[b, i] - threshold) / std[b, i])
    return out


@pytest.mark.parametrize('k', [1, 2, 3])
def test_prob_in_top_k_matches_kth_excluding(k):
    clean = torch.randn(6, 5)
    std = torch.rand(6, 5) + 0.1
    noisy = clean + torch.randn(6, 5) * std
    out = GateOutput(torch.zeros(6, 5), noisy.topk(k, 1).indices, clean, noisy, std)
    expected = brute_force_prob_in_top_k(clean, noisy, std, k)
    torch.testing.assert_close(prob_in_top_k(out), expected)


def test_load_loss_hand_value():
    # one row, N = 2, k = 1, noisy = [1, 0], clean = [0.5, 0.5], σ = 1:
    # expert 0 in top-1: thr = other noisy = 0 -> Φ(0.5); expert 1: thr = 1 -> Φ(-0.5)
    out = GateOutput(torch.tensor([[1., 0]]), torch.tensor([[0]]),
                     torch.tensor([[.5, .5]]), torch.tensor([[1., 0]]), torch.ones(1, 2))
    p0, p1 = Normal(0., 1.).cdf(torch.tensor(.5)).item(), Normal(0., 1.).cdf(torch.tensor(-.5)).item()
    mean = (p0 + p1) / 2
    var = ((p0 - mean) ** 2 + (p1 - mean) ** 2)  # unbiased over 2 values
    assert load_loss(out).item() == pytest.approx(var / mean ** 2, rel=1e-5)


def test_load_loss_needs_noise():
    with pytest.raises(ValueError, match='noisy'):
        load_loss(gate_output([[1., 0]]))


def test_switch_loss_hand_values():
    # f = [1, 0]; P = softmax([ln 3, 0]) = [.75, .25] -> 2 · .75 = 1.5
    out = gate_output([[1., 0], [1, 0]], logits=[[math.log(3), 0], [math.log(3), 0]])
    assert switch_loss(out).item() == pytest.approx(1.5)
    balanced = gate_output([[1., 0], [0, 1]], logits=torch.zeros(2, 2))
    assert switch_loss(balanced).item() == pytest.approx(1.0)


def test_router_z_loss_hand_value():
    assert router_z_loss(torch.zeros(3, 2)).item() == pytest.approx(math.log(2) ** 2)
    logits = torch.tensor([[0., math.log(3)]])  # logsumexp = ln 4
    assert router_z_loss(logits).item() == pytest.approx(math.log(4) ** 2)


def test_balance_losses_weights_and_validation():
    losses = BalanceLosses(dict(importance=0.5, kl_uniform=0.0, z=2.0))
    w = torch.tensor([[1., 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]])
    values = losses(gate_output(w, logits=torch.zeros(6, 3)))
    assert set(values) == {'importance', 'z'}  # zero weight is dropped
    assert values['importance'].item() == pytest.approx(0.125)
    assert values['z'].item() == pytest.approx(2 * math.log(3) ** 2)
    with pytest.raises(ValueError, match="'imbalance'"):
        BalanceLosses(dict(imbalance=1.0))
    with pytest.raises(ValueError, match='-0.1'):
        BalanceLosses(dict(importance=-0.1))
    with pytest.raises(ValueError, match='noisy'):
        BalanceLosses(dict(load=1.0), noisy=False)
    assert not BalanceLosses(None)
