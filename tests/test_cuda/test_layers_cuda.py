"""Every MoE layer on CUDA against the same layer (same weights, same inputs, same gate
noise) on the CPU: outputs, balance losses, gradients of the input and of every
parameter, and the buffers (hard-constraint statistics, BatchNorm statistics) over a
few training steps; and no host synchronisation in the layers that need none."""
import copy

import pytest
import torch
import torch.nn as nn

from helpers import redraw_parameters
from mmdet_moe.layers import CPMuMoEConv2d, MoE, MoEConv2d, TRMuMoEConv2d, end_iteration
from mmdet_moe.models.tower_moe import TowerMoE

pytestmark = pytest.mark.cuda

CUDA = torch.device('cuda')
C = 8
SOFT = dict(gate_cfg=dict(type='TopKGate', noisy=True),
            balance_cfg=dict(importance=0.5, load=0.5, kl_uniform=0.5, switch=0.1, z=1e-3))


def conv_moe(impl='fused', num_experts=4, gate_cfg=SOFT['gate_cfg'],
             balance_cfg=SOFT['balance_cfg'], **kwargs):
    return MoEConv2d(C, C, 3, padding=1, num_experts=num_experts, top_k=2, impl=impl,
                     gate_cfg=gate_cfg, balance_cfg=balance_cfg, **kwargs)


def tower():
    """A whole-subnet expert: conv3×3 + ReLU + conv3×3."""
    return nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.ReLU(), nn.Conv2d(C, C, 3, padding=1))


def subnet_moe(impl='dispatch', gate_cfg=SOFT['gate_cfg'], num_experts=4, top_k=2, **kwargs):
    return MoE(expert_factory=tower, num_experts=num_experts, in_channels=C, top_k=top_k,
               impl=impl, gate_cfg=gate_cfg, **kwargs)


def tower_moe():
    return TowerMoE([tower() for _ in range(4)], tower_name='cls_convs',
                    tower_children=['0', '1', '2'], in_channels=C, top_k=2,
                    impl='dispatch', **SOFT)


HARD = dict(type='RelativeImportanceGate', threshold=0.3)
# name → (layer factory, input shapes: one map, or a list of FPN level maps)
LAYERS = {
    # B·k ≥ N: the kernels mixed by einsum; B·k < N: gathered (embedding_bag)
    'conv-fused': (conv_moe, [(4, C, 7, 7)]),
    'conv-fused-gather': (lambda: conv_moe(num_experts=16), [(2, C, 7, 7)]),
    'conv-fused-strided-grouped': (lambda: MoEConv2d(
        C, C, 3, stride=2, padding=2, dilation=2, groups=2, num_experts=4, top_k=2,
        impl='fused', **SOFT), [(4, C, 9, 9)]),
    'conv-dispatch': (lambda: conv_moe('dispatch'), [(4, C, 7, 7)]),
    'conv-dispatch-capacity': (lambda: conv_moe('dispatch', capacity_factor=1.0),
                               [(6, C, 7, 7)]),
    'conv-dense': (lambda: conv_moe('dense'), [(4, C, 7, 7)]),
    'gate-conv': (lambda: conv_moe(gate_cfg=dict(type='TopKGate', gate_type='conv')),
                  [(4, C, 7, 7)]),
    'gate-paper-fc-switch': (lambda: conv_moe(gate_cfg=dict(
        type='TopKGate', gate_type='paper_fc', renormalize=False)), [(4, C, 7, 7)]),
    'gate-paper-conv': (lambda: conv_moe(gate_cfg=dict(type='TopKGate',
                                                       gate_type='paper_conv')),
                        [(4, C, 7, 7)]),
    'gate-relative-importance': (lambda: conv_moe(gate_cfg=HARD, balance_cfg=None),
                                 [(8, C, 7, 7)]),
    'gate-absolute-importance': (lambda: conv_moe(
        gate_cfg=dict(type='AbsoluteImportanceGate', threshold=0.05), balance_cfg=None),
        [(8, C, 7, 7)]),
    'subnet-dispatch-levels': (lambda: subnet_moe(balance_cfg=SOFT['balance_cfg']),
                               [(4, C, 8, 8), (4, C, 4, 4), (4, C, 2, 2)]),
    'subnet-dispatch-capacity-levels': (lambda: subnet_moe(capacity_factor=1.0),
                                        [(4, C, 8, 8), (4, C, 4, 4)]),
    'subnet-dense': (lambda: subnet_moe('dense'), [(4, C, 7, 7)]),
    'subnet-hard-levels': (lambda: subnet_moe(gate_cfg=HARD),
                           [(4, C, 8, 8), (4, C, 4, 4), (4, C, 2, 2)]),
    'subnet-equal-weights': (lambda: subnet_moe(gate_cfg=dict(type='EqualWeightGate'),
                                                num_experts=3, top_k=3), [(4, C, 7, 7)]),
    'tower-moe-levels': (tower_moe, [(4, C, 8, 8), (4, C, 4, 4)]),
    'cp-mumoe-pixel-entmax-bn': (lambda: CPMuMoEConv2d(C, C, 3, num_experts=32),
                                 [(4, C, 7, 7)]),
    'cp-mumoe-image-softmax-ln': (lambda: CPMuMoEConv2d(
        C, C, 3, num_experts=32, gate_mode='image', gate_act='softmax', norm='ln'),
        [(4, C, 7, 7)]),
    'tr-mumoe-pixel-entmax-bn': (lambda: TRMuMoEConv2d(C, C, 3, num_experts=32),
                                 [(4, C, 7, 7)]),
    'tr-mumoe-image-entmax-none': (lambda: TRMuMoEConv2d(
        C, C, 3, num_experts=32, gate_mode='image', norm=None), [(4, C, 7, 7)]),
}


def as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def projection(shape, seed: int) -> torch.Tensor:
    """A fixed random tensor drawn on the CPU: the same on both devices."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def training_step(layer, inputs, restart_noise):
    """Forward (gate noise restarted), loss ``Σ ⟨output, projection⟩`` + the balance
    losses, backward, end of iteration; the outputs, balance losses, gradients (of the
    inputs and parameters) and buffers, on the CPU."""
    layer.zero_grad(set_to_none=True)
    device = next(layer.parameters()).device
    inputs = [x.to(device).requires_grad_() for x in inputs]
    restart_noise()
    out = as_list(layer(inputs if len(inputs) > 1 else inputs[0]))
    aux = layer.aux_losses()
    loss = sum((y * projection(y.shape, i).to(device)).sum() for i, y in enumerate(out))
    (loss + sum(aux.values())).backward()
    end_iteration(layer)  # hard constraints count iterations
    grads = {f'input {i}': x.grad for i, x in enumerate(inputs)}
    grads.update((n, p.grad) for n, p in layer.named_parameters() if p.grad is not None)
    return {'output': [y.detach().cpu() for y in out],
            'balance losses': {k: v.detach().cpu() for k, v in aux.items()},
            'gradients': {k: v.cpu() for k, v in grads.items()},
            'buffers': {k: v.cpu() for k, v in layer.named_buffers()}}


def assert_close(got, want, what: str) -> None:
    """float32 agreement of CUDA and CPU kernels (TF32 off), relative to the scale."""
    if isinstance(want, dict):
        assert set(got) == set(want), (what, sorted(got), sorted(want))
        for key in want:
            assert_close(got[key], want[key], f'{what}: {key}')
    elif isinstance(want, list):
        assert len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f'{what} {i}')
    elif not want.is_floating_point():  # counts, flags, indices
        assert torch.equal(got, want), (what, got, want)
    else:
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale, msg=what)


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_layer_on_cuda_matches_cpu(name, same_noise):
    make, shapes = LAYERS[name]
    torch.manual_seed(0)
    cpu_layer = make().train()
    redraw_parameters(cpu_layer)  # zero-initialised gates (noise, μMoE) get weights too
    cuda_layer = copy.deepcopy(cpu_layer).to(CUDA)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        inputs = [torch.randn(shape, generator=gen) for shape in shapes]
        want = training_step(cpu_layer, inputs, same_noise)
        got = training_step(cuda_layer, inputs, same_noise)
        assert_close(got, want, f'{name}, step {step}')
        assert any('gate' in key for key in want['gradients']) or 'equal' in name
    if getattr(cpu_layer, 'capacity_factor', None) is not None:
        assert_close(cuda_layer.pop_overflow().cpu(), cpu_layer.pop_overflow(),
                     f'{name}: (dropped, routed) rows of capacity dispatch')


# the layers that need no host read on a GPU (DESIGN.md §3; dispatch without a capacity
# reads the rows per expert, by design); the load loss has a case of its own
NO_LOAD = {k: v for k, v in SOFT['balance_cfg'].items() if k != 'load'}
NO_HOST_SYNC = {
    'conv-fused': (lambda: conv_moe(balance_cfg=NO_LOAD), [(4, C, 7, 7)]),
    'conv-fused-gather': (lambda: conv_moe(num_experts=16, balance_cfg=NO_LOAD),
                          [(2, C, 7, 7)]),
    'conv-fused-load-loss': (lambda: conv_moe(balance_cfg=dict(load=0.5)), [(4, C, 7, 7)]),
    'conv-dispatch-capacity': (lambda: conv_moe('dispatch', capacity_factor=1.0,
                                                balance_cfg=NO_LOAD), [(6, C, 7, 7)]),
    'gate-paper-conv': (lambda: conv_moe(gate_cfg=dict(type='TopKGate', gate_type='paper_conv'),
                                         balance_cfg=NO_LOAD), [(4, C, 7, 7)]),
    'gate-relative-importance': LAYERS['gate-relative-importance'],
    'subnet-dispatch-capacity-levels': (lambda: subnet_moe(
        capacity_factor=1.0, balance_cfg=NO_LOAD), [(4, C, 8, 8), (4, C, 4, 4)]),
    'cp-mumoe-pixel-entmax-bn': LAYERS['cp-mumoe-pixel-entmax-bn'],
    'tr-mumoe-image-entmax-none': LAYERS['tr-mumoe-image-entmax-none'],
}


@pytest.mark.parametrize('name', sorted(NO_HOST_SYNC))
def test_training_step_does_not_synchronise_with_the_host(name):
    """CUDA's sync debug mode raises on any synchronising call (``.item()``, a
    blocking copy, ``nonzero``, also inside torch's kernels) in forward + backward."""
    make, shapes = NO_HOST_SYNC[name]
    layer = make().train().to(CUDA)
    inputs = [torch.randn(shape, device=CUDA) for shape in shapes]

    def step():
        out = as_list(layer(inputs if len(inputs) > 1 else inputs[0]))
        loss = sum(y.square().mean() for y in out) + sum(layer.aux_losses().values())
        loss.backward()
        end_iteration(layer)

    step()  # warm-up: lazy initialisation (cuDNN, allocator) may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        step()
        step()
    finally:
        torch.cuda.set_sync_debug_mode('default')
