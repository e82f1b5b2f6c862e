"""ExpertUtilisationHook: shares in the message hub, a warning when an expert starves."""
import logging

import pytest
import torch
import torch.nn as nn
from mmengine.logging import MessageHub, MMLogger

from mmdet_moe.engine.hooks import ExpertSizeStatsHook, ExpertUtilisationHook
from mmdet_moe.layers import MoEConv2d


class FakeRunner:
    def __init__(self, model):
        self.model = model
        self.iter = 0
        self.message_hub = MessageHub.get_instance('utilisation-test')
        self.logger = MMLogger.get_instance('utilisation-test', log_level='INFO')


def starving_model():
    """k=1 over 3 experts; the bias sends every image to expert 0 or 1, never 2."""
    model = nn.Sequential(MoEConv2d(4, 4, 3, padding=1, num_experts=3, top_k=1,
                                    gate_cfg=dict(noisy=False)))
    with torch.no_grad():
        model[0].gate.w_gate.weight.zero_()
        model[0].gate.w_gate.weight[1, 0] = 20.0
        model[0].gate.w_gate.bias.copy_(torch.tensor([1.0, 0.0, -10.0]))
    return model.train()


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_shares_are_logged_and_collapse_is_warned_once():
    model = starving_model()
    runner = FakeRunner(model)
    collect = Collect()
    runner.logger.addHandler(collect)
    hook = ExpertUtilisationHook(interval=2, collapse_share=0.01, collapse_intervals=3)
    hook.before_train(runner)
    x = torch.randn(8, 4, 5, 5)
    x[:4, 0] += 1.0  # these images go to expert 1, the others to expert 0
    x[4:, 0] -= 1.0
    for it in range(8):  # 4 intervals of 2 iterations
        runner.iter = it
        model(x)
        hook.after_train_iter(runner, it)
    hub = runner.message_hub
    assert hub.get_scalar('train/moe_train.0.share_e0').current() == pytest.approx(0.5)
    assert hub.get_scalar('train/moe_train.0.share_e2').current() == 0.0
    assert hub.get_scalar('train/moe_train.0.living_experts').current() == 2
    warnings = [m for m in collect.messages if 'collapsing' in m]
    assert len(warnings) == 1 and 'expert 2' in warnings[0] and 'MoE layer 0' in warnings[0]
    hook.after_train(runner)


def test_hooks_refuse_a_model_without_moe():
    runner = FakeRunner(nn.Sequential(nn.Conv2d(3, 3, 1)))
    with pytest.raises(ValueError, match='no MoE layer'):
        ExpertSizeStatsHook().before_run(runner)
    with pytest.raises(ValueError, match='no MoE layer'):
        ExpertUtilisationHook().before_train(runner)


def test_dropped_share_of_capacity_dispatch_is_logged_per_interval():
    """8 images all routed to expert 0 or 1 (k=1 of 3), capacity ceil(1.0·8·1/3) = 3
    rows per expert: 4 images each want experts 0 and 1, so 1 + 1 of 8 pairs drop."""
    model = starving_model()
    model[0].impl, model[0].capacity_factor = 'dispatch', 1.0
    runner = FakeRunner(model)
    hook = ExpertUtilisationHook(interval=2)
    hook.before_train(runner)
    x = torch.randn(8, 4, 5, 5)
    x[:4, 0] += 1.0
    x[4:, 0] -= 1.0
    for it in range(2):
        runner.iter = it
        model(x)
        hook.after_train_iter(runner, it)
    dropped = runner.message_hub.get_scalar('train/moe_train.0.dropped_share').current()
    assert dropped == pytest.approx(2 / 8)
    assert model[0].pop_overflow() is None  # read and reset by the report
    hook.after_train(runner)
