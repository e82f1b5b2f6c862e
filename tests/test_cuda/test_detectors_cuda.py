"""Every toy MoE detector (``configs/toy/*moe*.py``) on CUDA: training steps under
fp16 and bf16 autocast as ``tools/train.py --amp`` runs them (mmengine's
``AmpOptimWrapper``), and float32 losses and gradients equal to the CPU's.

mmcv 2.1.0's CUDA kernels of the sigmoid focal loss and of RoIAlign are compiled for
float32, float64 and float16 only: under bf16 autocast a stock RetinaNet or Faster
R-CNN stops there too (``"..." not implemented for 'BFloat16'``). The bf16 steps
therefore run those two kernels in float32 (``mmcv_kernels_in_float32``); the fp16
steps run everything as it is.
"""
import copy
import os.path as osp

import pytest
import torch

from helpers import TOY_MOE_CONFIGS, build_model, load_config
from mmdet_moe.layers import (AbsoluteImportanceGate, RelativeImportanceGate,
                              is_moe_module)
from mmdet_moe.models.moe_losses import LOSS_PREFIX

pytestmark = pytest.mark.cuda

CUDA = torch.device('cuda')
# a fixed loss scale: a dynamic one skips a step whose scaled gradients overflow (and
# halves the scale), which would hide non-finite gradients from the assertions
LOSS_SCALE = 512.0


def toy_batch(num_classes=5, size=96):
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(0)
    return demo_mm_inputs(2, [[3, size, size]] * 2, num_items=[3] * 2,
                          num_classes=num_classes)


def expected_balance_losses(model):
    """``loss_moe_<name>`` of every balance loss the model's MoE layers compute."""
    return {LOSS_PREFIX + name for module in model.modules() if is_moe_module(module)
            for name in module.balance_losses.weights}


def hard_constraint_gates(model):
    return [m for m in model.modules()
            if isinstance(m, (RelativeImportanceGate, AbsoluteImportanceGate))]


@pytest.fixture
def mmcv_kernels_in_float32(monkeypatch):
    """mmcv's CUDA sigmoid focal loss and RoIAlign on float32 inputs, their outputs
    cast back: what a bf16 build of those kernels would compute, in float32."""
    from mmcv.ops.roi_align import RoIAlign
    from mmdet.models.losses import focal_loss

    cuda_focal_loss = focal_loss._sigmoid_focal_loss
    roi_align = RoIAlign.forward

    def float_focal_loss(pred, target, *args):
        return cuda_focal_loss(pred.float(), target, *args)

    def float_roi_align(self, feats, rois):
        return roi_align(self, feats.float(), rois.float()).to(feats.dtype)

    monkeypatch.setattr(focal_loss, '_sigmoid_focal_loss', float_focal_loss)
    monkeypatch.setattr(RoIAlign, 'forward', float_roi_align)


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
@pytest.mark.parametrize('path', TOY_MOE_CONFIGS, ids=osp.basename)
def test_amp_training_steps(path, dtype, request):
    from mmengine.optim import AmpOptimWrapper
    if dtype == 'bfloat16':
        if not torch.cuda.is_bf16_supported():
            pytest.skip(f'{torch.cuda.get_device_name()} has no bfloat16')
        request.getfixturevalue('mmcv_kernels_in_float32')
    torch.manual_seed(0)
    model = build_model(load_config(path).model).to(CUDA).train()
    wrapper = AmpOptimWrapper(
        optimizer=torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9),
        dtype=dtype, loss_scale=LOSS_SCALE)
    balance = expected_balance_losses(model)
    moe_params = {n: p for n, p in model.named_parameters() if '.gate.' in n
                  or n.endswith('gate_weight')}
    assert moe_params or 'equal' in path
    packed = toy_batch()
    for step in range(2):
        before = {n: p.detach().clone() for n, p in moe_params.items()}
        data = model.data_preprocessor(copy.deepcopy(packed), True)
        with wrapper.optim_context(model):  # autocast(dtype), as the runner's train step
            losses = model(**data, mode='loss')
        loss, _ = model.parse_losses(losses)
        assert balance <= set(losses), (sorted(balance), sorted(losses))
        for key, value in losses.items():
            for t in value if isinstance(value, list) else [value]:
                assert torch.isfinite(t).all(), (dtype, step, key)
                if key.startswith(LOSS_PREFIX):
                    assert t.dtype == torch.float32, (key, t.dtype)
        wrapper.backward(loss)
        wrapper.loss_scaler.unscale_(wrapper.optimizer)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
        assert not bad, f'{dtype}, step {step}: non-finite gradients in {bad}'
        missing = [n for n in moe_params if n not in grads]
        assert not missing, f'gate parameters without a gradient: {missing}'
        wrapper.step()  # the scaler's step: skipped if it found inf (asserted above)
        wrapper.zero_grad()
        assert not moe_params or any(not torch.equal(before[n], p)
                                     for n, p in moe_params.items()), \
            'the optimizer step left the gates unchanged'
    for gate in hard_constraint_gates(model):  # the statistic was updated on the device
        assert gate.num_updates.item() > 0 and torch.isfinite(gate.usage).all()


SINGLE_STAGE = [p for p in TOY_MOE_CONFIGS if 'rcnn' not in osp.basename(p)]


@pytest.mark.parametrize('path', SINGLE_STAGE, ids=osp.basename)
def test_float32_losses_and_gradients_match_cpu(path, same_noise):
    """The whole training forward and backward on CUDA (cuDNN, mmcv's CUDA focal loss)
    against the CPU's (mmdet's PyTorch focal loss). Two-stage detectors sample RoIs
    with the device's random generator, so they are left out."""
    torch.manual_seed(0)
    cpu_model = build_model(load_config(path).model).train()
    cuda_model = copy.deepcopy(cpu_model).to(CUDA)
    packed = toy_batch()
    results = []
    for model in (cpu_model, cuda_model):
        data = model.data_preprocessor(copy.deepcopy(packed), True)
        same_noise()
        losses = model(**data, mode='loss')
        loss, _ = model.parse_losses(losses)
        loss.backward()
        moe = {f'{name}.{n}': p.grad.cpu() for name, module in model.named_modules()
               if is_moe_module(module) for n, p in module.named_parameters()
               if p.grad is not None}
        results.append(({k: torch.stack(v).sum() if isinstance(v, list) else v
                         for k, v in losses.items()}, moe))
    (want_losses, want_grads), (got_losses, got_grads) = results
    assert set(got_losses) == set(want_losses)
    for key, value in want_losses.items():
        torch.testing.assert_close(got_losses[key].cpu(), value, rtol=1e-4, atol=1e-5,
                                   msg=key)
    assert want_grads and set(got_grads) == set(want_grads)
    for name, grad in want_grads.items():
        scale = max(grad.abs().max().item(), 1e-8)
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-3 * scale,
                                   msg=name)
