"""No host synchronisation from mmdet_moe in a training step: every tensor read on the
host (``.item()``, ``.cpu()``, ``.tolist()``, ``.numpy()``, ``bool(t)``, ``int(t)``,
``float(t)``, ``torch.nonzero``) stalls a GPU pipeline. The one documented exception:
``dispatch`` (experts run on their routed rows only) reads the rows per expert: once
per step for a MoE container called with all FPN levels, once per call for a
dispatched MoEConv2d (routed per image or per location); with a capacity factor,
never."""
import os.path as osp
import traceback
from collections import Counter
from contextlib import contextmanager

import pytest
import torch

from helpers import TOY_MOE_CONFIGS, build_model, load_config, one_training_step
from mmdet_moe.layers import MoE, is_moe_module, routes_pixels

PACKAGE = osp.join('mmdet_moe', '')
# the rows per expert: of a MoEConv2d, once per call (the locations per expert when it
# routes per location); of a MoE container (whole-subnet experts), once per step for
# all the FPN levels it is called with
ALLOWED = {('conv_ops.py', 'dispatch', 'tolist'), ('moe.py', 'forward', 'tolist'),
           ('pixel_routing.py', 'routed_pixel_conv2d', 'tolist')}
HOST_READS = ('item', 'cpu', 'tolist', 'numpy', '__bool__', '__int__', '__float__',
              'nonzero')


@contextmanager
def count_host_reads():
    """Count host reads whose caller is a file of mmdet_moe: {(file, function): n}."""
    counts = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    original_nonzero = torch.nonzero

    def caller():
        for frame in reversed(traceback.extract_stack()[:-2]):
            if PACKAGE in frame.filename:
                return osp.basename(frame.filename), frame.name
            if 'torch' not in frame.filename and 'test_host_syncs' not in frame.filename:
                return None
        return None

    def counting(name, method):
        def read(self, *args, **kwargs):
            where = caller()
            if where is not None:
                counts[where + (name,)] += 1
            return method(self, *args, **kwargs)
        return read

    for name, method in originals.items():
        setattr(torch.Tensor, name, counting(name, method))
    torch.nonzero = counting('nonzero', original_nonzero)
    try:
        yield counts
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
        torch.nonzero = original_nonzero



@pytest.mark.slow
@pytest.mark.parametrize('path', TOY_MOE_CONFIGS, ids=osp.basename)
def test_training_steps_read_nothing_on_the_host(path):
    model = build_model(load_config(path).model)
    one_training_step(model, image_size=96)  # warm-up: lazy set-up may read once
    with count_host_reads() as counts:
        for _ in range(3):
            one_training_step(model, image_size=96)
    unexpected = {k: v for k, v in counts.items() if k not in ALLOWED}
    assert not unexpected, f'host reads from mmdet_moe in 3 training steps: {unexpected}'
    layers = sum(is_moe_module(m) for m in model.modules())
    for key, n in counts.items():  # once per call (≤ 5 FPN levels), not per expert
        assert n <= 3 * layers * 5, (key, n, layers)
    containers = sum(isinstance(m, MoE) and m.impl == 'dispatch' for m in model.modules())
    assert counts[('moe.py', 'forward', 'tolist')] <= 3 * containers  # once per step
    if containers:  # and the containers' dispatch reads nothing more per level
        assert counts[('conv_ops.py', 'dispatch', 'tolist')] <= 3 * (layers - containers) * 5


@pytest.mark.slow
@pytest.mark.parametrize('path', TOY_MOE_CONFIGS, ids=osp.basename)
def test_capacity_dispatch_reads_nothing_on_the_host(path):
    """With a capacity factor, dispatched experts run on fixed row counts: no read.
    (Per-location routing takes no capacity: its dispatch is left out.)"""
    model = build_model(load_config(path).model)
    dispatched = [m for m in model.modules() if getattr(m, 'impl', None) == 'dispatch'
                  and not routes_pixels(m.gate)]
    if not dispatched:
        pytest.skip('no dispatched MoE layer in this config')
    for module in dispatched:
        module.capacity_factor = 1.25
    one_training_step(model, image_size=96)
    with count_host_reads() as counts:
        for _ in range(3):
            one_training_step(model, image_size=96)
    assert not counts, f'host reads from mmdet_moe in 3 training steps: {dict(counts)}'
    assert all(m.pop_overflow() is not None for m in dispatched)


def test_the_counter_sees_a_host_read():
    from mmdet_moe.layers import TopKGate
    with count_host_reads() as counts:
        TopKGate(8, num_experts=4, top_k=2).eval()(torch.randn(2, 8, 4, 4))
    assert counts, 'the eval-mode finiteness check reads on the host and must be seen'


def test_utilisation_hook_reads_on_the_host_once_per_interval():
    """The hook sums gate weights on the device; it reads them back when it logs."""
    from types import SimpleNamespace

    from mmengine.logging import MessageHub

    from mmdet_moe.engine.hooks import ExpertUtilisationHook
    model = build_model(load_config(TOY_MOE_CONFIGS[-1]).model)
    runner = SimpleNamespace(model=model, message_hub=MessageHub.get_instance('syncs'),
                             logger=None, iter=0)
    hook = ExpertUtilisationHook(interval=3)
    hook.before_train(runner)
    with count_host_reads() as counts:
        for i in range(2):
            one_training_step(model, image_size=96)
            runner.iter = i
            hook.after_train_iter(runner, i)
    assert not {k: v for k, v in counts.items() if k not in ALLOWED}, counts
    one_training_step(model, image_size=96)
    runner.iter = 2
    hook.after_train_iter(runner, 2)  # logs: reads once
    hook.after_train(runner)
    assert any(k.endswith('.share_e0') for k in runner.message_hub.log_scalars)


@pytest.mark.parametrize('loss', ['importance', 'kl_uniform', 'load'])
def test_balance_losses_read_nothing_on_the_host(loss):
    """Each soft constraint, forward and backward (``load`` read 4 times per call
    through torch.distributions.Normal's argument check)."""
    from mmdet_moe.layers import MoEConv2d
    layer = MoEConv2d(8, 8, 3, padding=1, num_experts=4, top_k=2,
                      gate_cfg=dict(noisy=True), balance_cfg={loss: 0.5}).train()
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    with count_host_reads() as counts:
        out = layer(x)
        sum(layer.pop_aux_losses().values()).add(out.sum()).backward()
    assert not counts, f'host reads from mmdet_moe in the {loss} loss: {dict(counts)}'
