import pytest
import torch
import torch.nn.functional as F

from mmdet_moe.layers import (AbsoluteImportanceGate, NonFiniteGateError, RelativeImportanceGate,
                              TopKGate, assign_moe_names, build_gate, MoEConv2d)


@pytest.mark.parametrize('gate_type', ['linear', 'conv'])
def test_topk_sparsity_rows_and_eval_values(gate_type):
    gate = TopKGate(8, num_experts=5, top_k=2, gate_type=gate_type).eval()
    x = torch.randn(6, 8, 7, 7)
    out = gate(x)
    assert out.weights.shape == (6, 5) and out.indices.shape == (6, 2)
    assert ((out.weights > 0).sum(1) == 2).all()
    torch.testing.assert_close(out.weights.sum(1), torch.ones(6))
    # eval: softmax over the two largest clean logits, nothing else
    top = out.logits.topk(2, dim=1)
    expected = torch.zeros(6, 5).scatter(1, top.indices, F.softmax(top.values, 1))
    torch.testing.assert_close(out.weights, expected)
    assert out.noisy_logits is None


def test_linear_gate_is_linear_on_gap():
    gate = TopKGate(4, 3, 1).eval()
    x = torch.randn(2, 4, 5, 5)
    expected = x.mean((2, 3)) @ gate.w_gate.weight.t() + gate.w_gate.bias
    torch.testing.assert_close(gate(x).logits, expected)


def test_noise_only_in_training():
    gate = TopKGate(8, 4, 2, noisy=True)
    x = torch.randn(5, 8, 4, 4)
    gate.eval()
    a, b = gate(x), gate(x)
    assert torch.equal(a.weights, b.weights)
    gate.train()
    c, d = gate(x), gate(x)
    assert c.noisy_logits is not None and not torch.equal(c.noisy_logits, d.noisy_logits)
    # σ = softplus(W_n · GAP(x)) + 0.01, W_n initialised to zero
    torch.testing.assert_close(c.noise_std, torch.full((5, 4), F.softplus(torch.tensor(0.)).item() + 0.01))


def test_list_input_shares_gate_over_levels():
    gate = TopKGate(8, 4, 2).eval()
    levels = [torch.randn(3, 8, 8, 8), torch.randn(3, 8, 4, 4)]
    out = gate(levels)
    assert out.weights.shape == (6, 4)
    torch.testing.assert_close(out.split([3, 3])[1].weights, gate(levels[1]).weights)


@pytest.mark.parametrize('kwargs, match', [
    (dict(num_experts=1, top_k=1), 'num_experts'),
    (dict(num_experts=4, top_k=0), 'top_k'),
    (dict(num_experts=4, top_k=5), 'top_k'),
    (dict(num_experts=4, top_k=2, gate_type='mlp'), "'mlp'"),
])
def test_gate_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopKGate(8, **kwargs)


def test_build_gate_rejects_unknown_type():
    with pytest.raises(ValueError, match="'Foo'"):
        build_gate(dict(type='Foo'), 8, 4, 2)
    with pytest.raises(ValueError, match='threshold'):
        build_gate(dict(type='RelativeImportanceGate', threshold=0), 8, 4, 2)


def test_non_finite_logits_name_the_layer():
    """In eval at once; in training flagged on the device and raised by the check
    at the end of every NONFINITE_CHECK_INTERVAL-th iteration (no host read per call)."""
    from mmdet_moe.layers import end_iteration
    from mmdet_moe.layers.gates import NONFINITE_CHECK_INTERVAL
    model = torch.nn.Sequential(MoEConv2d(4, 4, 3, padding=1))
    assign_moe_names(model)
    x = torch.randn(2, 4, 5, 5)
    x[0, 0, 0, 0] = float('nan')
    with pytest.raises(NonFiniteGateError, match=r'0\.gate.*input of shape.*input '
                       r'features are not finite.*before it'):
        model.eval()(x)
    model.train()(x)  # flagged, not raised
    for _ in range(NONFINITE_CHECK_INTERVAL - 1):
        end_iteration(model)
    with pytest.raises(NonFiniteGateError, match=r'0\.gate.*training step.*input '
                       r'features are not finite'):
        end_iteration(model)
    end_iteration(model)  # the flag was reset with the error


@pytest.mark.parametrize('gate_type', ['linear', 'conv', 'paper_fc'])
def test_non_finite_logits_from_finite_input_blame_the_gate_weights(gate_type):
    """The error says where the NaN came from: the layers before the gate (its input;
    e.g. weights never initialised) or the gate itself (e.g. a learning rate too high),
    whatever the gate computes from its input (a conv gate's own conv too)."""
    layer = MoEConv2d(4, 4, 3, padding=1, gate_cfg=dict(gate_type=gate_type))
    with torch.no_grad():
        broken = layer.gate.conv.weight if gate_type == 'conv' else layer.gate.w_gate.weight
        broken.fill_(float('inf'))
    with pytest.raises(NonFiniteGateError, match=r'input is finite.*gate\'s own weights'):
        layer.eval()(torch.randn(2, 4, 5, 5))


def biased_gate(cls, **kwargs):
    """A k=1 gate over 4 experts whose preference order is 0 > 1 > 2 > 3 for any input."""
    gate = cls(4, num_experts=4, top_k=1, threshold=0.3, **kwargs)
    with torch.no_grad():
        gate.w_gate.weight.zero_()
        gate.w_gate.bias.copy_(torch.tensor([3., 2., 1., 0.]))
    return gate.train()


def test_relative_importance_masks_over_a_sequence_of_batches():
    gate = biased_gate(RelativeImportanceGate)
    x = torch.randn(4, 4, 3, 3)
    # batch 1: all on expert 0; fair share B/N = 1 -> r = [3, -1, -1, -1]
    assert gate(x).indices.flatten().tolist() == [0] * 4
    torch.testing.assert_close(gate.usage, torch.tensor([3., -1, -1, -1]))
    # batch 2: expert 0 masked (r > 0.3) -> all on expert 1 -> r = [2, 2, -2, -2]
    out = gate(x)
    assert out.expert_mask.tolist() == [[True, False, False, False]] * 4
    assert out.indices.flatten().tolist() == [1] * 4
    torch.testing.assert_close(gate.usage, torch.tensor([2., 2, -2, -2]))
    # batch 3: experts 0 and 1 masked -> expert 2
    out = gate(x)
    assert out.expert_mask.tolist() == [[True, True, False, False]] * 4
    assert out.indices.flatten().tolist() == [2] * 4
    # eval: no masking, no update
    usage = gate.usage.clone()
    gate.eval()
    assert gate(x).indices.flatten().tolist() == [0] * 4
    assert torch.equal(gate.usage, usage)


def test_hard_constraint_keeps_top_k_experts_available():
    gate = RelativeImportanceGate(4, 4, 2, threshold=0.3)
    gate.usage.copy_(torch.tensor([1., 2., 3., -6.]))  # three over τ, only N-k = 2 may go
    mask = gate.train().expert_mask()
    assert mask.tolist() == [False, True, True, False]


def test_hard_constraint_warmup_counts_iterations_and_state_dict_round_trip():
    """warmup_iters counts training iterations (end_iteration), not gate calls."""
    gate = biased_gate(RelativeImportanceGate, warmup_iters=2)
    x = torch.randn(4, 4, 3, 3)
    for _ in range(2):  # two iterations of three gate calls each (e.g. three levels)
        gate(x), gate(x), gate(x)
        gate.end_iteration()
    assert gate.usage.abs().sum() == 0 and gate.num_iters.item() == 2
    gate(x)  # first counted call
    gate(x)  # expert 0 masked now
    gate.end_iteration()
    restored = biased_gate(RelativeImportanceGate, warmup_iters=2)
    restored.load_state_dict(gate.state_dict())
    assert torch.equal(restored.usage, gate.usage)
    assert restored.num_iters.item() == 3 and restored.num_updates.item() == 2
    assert torch.equal(restored.expert_mask(), gate.expert_mask())


def test_absolute_importance_running_mean():
    gate = biased_gate(AbsoluteImportanceGate)
    x = torch.randn(4, 4, 3, 3)
    gate(x)  # m = [1, 0, 0, 0]; 1 - 1/4 > 0.3 -> expert 0 masked next
    torch.testing.assert_close(gate.usage, torch.tensor([1., 0, 0, 0]))
    out = gate(x)  # all on expert 1: m = [.5, .5, 0, 0]
    assert out.expert_mask.tolist() == [[True, False, False, False]] * 4
    torch.testing.assert_close(gate.usage, torch.tensor([.5, .5, 0, 0]))
    # .5 - .25 = .25 < .3: nobody masked
    assert not gate.expert_mask().any()


def test_top1_renormalized_gate_gets_no_task_gradient_and_warns():
    """Defect: with top_k=1 the softmax over one kept logit is 1: no gradient."""
    with pytest.warns(UserWarning, match='renormalize=False'):
        gate = TopKGate(4, 3, 1, noisy=False)
    gate(torch.randn(5, 4, 3, 3)).weights.sum().backward()
    assert gate.w_gate.weight.grad.abs().sum() == 0


@pytest.mark.parametrize('top_k', [1, 2])
def test_switch_weighting_is_the_softmax_over_all_experts(top_k):
    """renormalize=False: each kept expert weighs its probability in the softmax over
    all N logits (Switch Transformer's formula); the gate gets a task gradient."""
    gate = TopKGate(4, 5, top_k, noisy=False, renormalize=False)
    x = torch.randn(6, 4, 3, 3)
    out = gate(x)
    probs = F.softmax(x.mean((2, 3)) @ gate.w_gate.weight.t() + gate.w_gate.bias, dim=1)
    top = probs.topk(top_k, dim=1)
    torch.testing.assert_close(out.weights,
                               torch.zeros(6, 5).scatter(1, top.indices, top.values))
    (out.weights * torch.randn(6, 5)).sum().backward()
    assert gate.w_gate.weight.grad.abs().sum() > 0


def test_switch_weighting_keeps_hard_constraint_masks():
    gate = RelativeImportanceGate(4, 4, 1, threshold=0.3, renormalize=False)
    gate.usage.copy_(torch.tensor([5., 0., 0., 0.]))  # expert 0 over-used: masked
    out = gate(torch.randn(8, 4, 2, 2))
    assert (out.weights[:, 0] == 0).all() and (out.weights.sum(1) < 1).all()


def test_switch_weighting_keeps_balance_statistics_calibrated():
    """With rows summing to less than 1, balanced use still gives KL-to-uniform 0 and
    no drift of the relative importance (shares of the gate mass, not of B rows)."""
    from mmdet_moe.layers import kl_uniform_loss
    gate = RelativeImportanceGate(4, 4, 1, threshold=0.3, renormalize=False, noisy=False)
    with torch.no_grad():
        gate.w_gate.weight.copy_(4 * torch.eye(4))
        gate.w_gate.bias.zero_()
    x = torch.eye(4)[:, :, None, None]
    out = gate(x)  # each row picks another expert with the same probability
    assert sorted(out.indices.squeeze(1).tolist()) == [0, 1, 2, 3]
    assert (out.weights.sum(1) < 1).all()
    assert kl_uniform_loss(out).item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(gate.usage, torch.zeros(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize('cls', [RelativeImportanceGate, AbsoluteImportanceGate])
def test_levels_in_one_call_equal_the_gate_called_level_by_level(cls):
    """The paper's RetinaNet calls its gate once per FPN level: mask before and
    statistic update after each level. A list of levels must do exactly that."""
    import copy
    torch.manual_seed(0)
    gate = cls(8, num_experts=4, top_k=1, threshold=0.3, renormalize=False).train()
    with torch.no_grad():
        gate.w_gate.bias.copy_(torch.tensor([2., 1., 0., 0.]))  # over-use: masks happen
    reference = copy.deepcopy(gate)
    levels = [torch.randn(3, 8, s, s) for s in (8, 4, 2, 1, 1)]
    for _ in range(3):  # three iterations
        got = gate(levels)
        want = [reference(level) for level in levels]
        torch.testing.assert_close(got.weights, torch.cat([w.weights for w in want]))
        assert torch.equal(got.expert_mask, torch.cat([w.expert_mask for w in want]))
        torch.testing.assert_close(gate.usage, reference.usage)
        gate.end_iteration(), reference.end_iteration()
    assert got.expert_mask.any()  # the sequence did mask experts
    assert gate.num_updates.item() == 15 and gate.num_iters.item() == 3


def test_joint_level_updates_route_all_levels_with_one_mask():
    gate = RelativeImportanceGate(8, 4, 1, threshold=0.3, level_updates='joint',
                                  renormalize=False).train()
    out = gate([torch.randn(2, 8, 4, 4), torch.randn(2, 8, 2, 2)])
    assert gate.num_updates.item() == 1 and not out.expert_mask.any()
    with pytest.raises(ValueError, match="level_updates must be one of"):
        RelativeImportanceGate(8, 4, 1, level_updates='per_level')


def test_paper_gates_compute_the_reference_formulas():
    """paper_fc: W·GAP(ReLU(x)) + b; paper_conv: W·GAP(conv3×3, no padding, 256
    channels) + b; noise std softplus(W_n·GAP(x) + 0.01) on the raw input."""
    x = torch.randn(3, 8, 6, 6)
    fc = TopKGate(8, 4, 2, gate_type='paper_fc')
    torch.testing.assert_close(fc.eval()(x).logits, fc.w_gate(F.relu(x).mean((2, 3))))
    conv = TopKGate(8, 4, 2, gate_type='paper_conv')
    assert conv.conv.out_channels == 256 and conv.conv.padding == (0, 0)
    torch.testing.assert_close(conv.eval()(x).logits,
                               conv.w_gate(F.conv2d(x, conv.conv.weight, conv.conv.bias)
                                           .mean((2, 3))))
    with torch.no_grad():
        fc.w_noise.weight.normal_()
    std = fc.train()(x).noise_std
    torch.testing.assert_close(std, F.softplus(fc.w_noise(x.mean((2, 3))) + 0.01))
    with pytest.raises(ValueError, match=r"gate_type must be one of \['conv', 'linear', "
                                         r"'paper_conv', 'paper_fc', 'paper_simple'\], "
                                         r"got 'fc'"):
        TopKGate(8, 4, 2, gate_type='fc')


def paper_simple_gate(x, w_fc, b_fc, w_noise, top_k):
    """The paper's ``SimpleGate`` in training, re-typed from its code
    (``models/moe_layer/soft_gating_networks.py`` 100-111 and
    ``base_components/base_gating_network.py`` 44-63): logits, noise std, weights."""
    flat = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
    logits = flat @ w_fc.t() + b_fc
    std = F.softplus(flat @ w_noise.t() + 1e-2)
    logits = logits + torch.randn_like(logits) * std
    top_k_logits, top_k_indices = logits.topk(top_k, dim=1)
    weights = torch.zeros_like(logits).scatter(1, top_k_indices,
                                               F.softmax(top_k_logits, dim=1))
    return logits, std, weights


def test_paper_simple_gate_computes_the_papers_simple_gate():
    """Same weights, same seed: the paper's noisy logits, noise std and weights."""
    torch.manual_seed(0)
    gate = TopKGate(8, 4, 2, noisy=True, gate_type='paper_simple').train()
    x = torch.randn(6, 8, 5, 7)
    torch.manual_seed(1)
    out = gate(x)
    torch.manual_seed(1)
    logits, std, weights = paper_simple_gate(x, gate.w_gate.weight, gate.w_gate.bias,
                                             gate.w_noise.weight, top_k=2)
    torch.testing.assert_close(out.noisy_logits, logits)
    torch.testing.assert_close(out.noise_std, std)
    torch.testing.assert_close(out.weights, weights)
    # eval: the clean logits W·GAP(x) + b
    torch.testing.assert_close(gate.eval()(x).logits, gate.w_gate(x.mean((2, 3))))


def test_paper_gates_noise_layer_is_the_papers_bias_free_default_init():
    """The paper's W_n is ``nn.Linear(C, N, bias=False)`` with PyTorch's default init,
    so the noise std differs between inputs from the start; the plugin's own gates
    start from zero (the same std for every input)."""
    for gate_type in ('paper_simple', 'paper_fc', 'paper_conv'):
        torch.manual_seed(3)
        gate = TopKGate(8, 4, 2, noisy=True, gate_type=gate_type).train()
        torch.manual_seed(3)
        if gate_type == 'paper_conv':
            torch.nn.Conv2d(8, 256, 3)
        torch.nn.Linear(256 if gate_type == 'paper_conv' else 8, 4)  # w_gate's draws
        want = torch.nn.Linear(8, 4, bias=False)
        assert gate.w_noise.bias is None
        torch.testing.assert_close(gate.w_noise.weight, want.weight)
        std = gate(torch.randn(5, 8, 6, 6)).noise_std
        assert (std.std(0) > 1e-3).all()
    linear = TopKGate(8, 4, 2, noisy=True).train()
    std = linear(torch.randn(5, 8, 6, 6)).noise_std
    torch.testing.assert_close(std, torch.full_like(std, F.softplus(torch.tensor(0.)) + 0.01))


def test_load_loss_honours_the_hard_constraint_mask():
    """A masked expert did not compete: load probability 0, and the thresholds come
    from the masked noisy logits (reference: Shazeer's formula on those logits)."""
    from mmdet_moe.layers import prob_in_top_k
    gate = RelativeImportanceGate(4, 4, 2, threshold=0.3, noisy=True).train()
    gate.usage.copy_(torch.tensor([5., 0., 0., 0.]))  # expert 0 off
    out = gate(torch.randn(6, 4, 3, 3))
    assert out.expert_mask[:, 0].all() and not out.expert_mask[:, 1:].any()
    prob = prob_in_top_k(out)
    assert (prob[:, 0] == 0).all()
    normal = torch.distributions.Normal(0., 1.)
    noisy = out.noisy_logits[:, 1:]  # the competing experts
    for i in range(1, 4):
        others = torch.cat([noisy[:, :i - 1], noisy[:, i:]], 1)
        thr = others.topk(2, dim=1).values[:, 1]  # k-th largest of the other experts
        want = normal.cdf((out.logits[:, i] - thr) / out.noise_std[:, i])
        torch.testing.assert_close(prob[:, i], want)


def test_equal_weight_gate_is_the_no_gate_baseline():
    from mmdet_moe.layers import EqualWeightGate, MoE
    gate = build_gate(dict(type='EqualWeightGate'), 4, 3, 3)
    assert isinstance(gate, EqualWeightGate)
    experts = [torch.nn.Conv2d(4, 5, 3, padding=1) for _ in range(3)]
    moe = MoE(experts, top_k=3, gate=gate).train()
    x = torch.randn(2, 4, 6, 6)
    want = sum(e(x) for e in experts) / 3
    torch.testing.assert_close(moe(x), want)
    torch.testing.assert_close(moe([x, x[:1]])[1], want[:1])
    with pytest.raises(ValueError, match='top_k must be num_experts=3, got 2'):
        build_gate(dict(type='EqualWeightGate'), 4, 3, 2)


def test_load_loss_gradients_stay_finite_with_n_minus_k_experts_masked():
    """With N−k experts masked, the (k+1)-th largest masked logit is −∞: the kept
    experts have no rival (probability 1) and every gradient stays finite."""
    from mmdet_moe.layers import load_loss, prob_in_top_k
    gate = RelativeImportanceGate(4, 4, 2, threshold=0.3, noisy=True).train()
    with torch.no_grad():
        gate.w_noise.weight.normal_()
    gate.usage.copy_(torch.tensor([1., 1., 0., 0.]))  # experts 0 and 1 off: 2 = N − k
    out = gate(torch.randn(6, 4, 3, 3))
    prob = prob_in_top_k(out)
    torch.testing.assert_close(prob, torch.tensor([[0., 0., 1., 1.]]).expand(6, -1))
    load_loss(out).backward()
    for p in (gate.w_gate.weight, gate.w_noise.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize('kwargs, match', [
    (dict(gate_type='linear', conv_channels=32), "conv_channels=32.*gate_type='linear'"),
    (dict(gate_type='conv', conv_channels=0), 'conv_channels=0'),
])
def test_conv_channels_only_for_conv_gates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopKGate(8, 4, 2, **kwargs)


def test_paper_conv_gate_names_maps_too_small_for_it():
    with pytest.raises(ValueError, match=r"paper_conv.*at least 3×3, got \(2, 2\)"):
        TopKGate(8, 4, 2, gate_type='paper_conv')(torch.randn(1, 8, 2, 2))


def test_top_k_override_is_refused_for_the_equal_weight_gate():
    from mmdet_moe.layers import MoE, override_routing
    moe = MoE([torch.nn.Conv2d(4, 4, 1) for _ in range(3)], in_channels=4, top_k=3,
              gate_cfg=dict(type='EqualWeightGate'))
    with pytest.raises(ValueError, match='EqualWeightGate.*top_k cannot be overridden'):
        with override_routing(moe, top_k=1):
            pass
