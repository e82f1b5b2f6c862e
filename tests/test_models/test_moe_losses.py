"""The balance losses of every MoE module reach the loss dict of any mmdet detector,
and MoE detectors pickle."""
import io
import pickle

import pytest
import torch
from mmengine.config import ConfigDict

from helpers import build_model, one_training_step, stock_model_cfg
from mmdet_moe.layers import importance_loss, is_moe_module, record_gates
from mmdet_moe.models import add_moe_losses

RETINANET = 'retinanet/retinanet_r50_fpn_1x_coco.py'
FASTER_RCNN = 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
WIDTH = 64
IMPORTANCE = dict(importance=0.5)
MOE = dict(type='MoEConv2d', num_experts=3, top_k=2, balance_cfg=IMPORTANCE)


def stock_retinanet_with_moe_fpn():
    model = stock_model_cfg(RETINANET, WIDTH)
    model.neck.update(type='MoEFPN', balance_cfg=IMPORTANCE)
    return model


def stock_faster_rcnn_with_conv_cfg():
    model = stock_model_cfg(FASTER_RCNN, WIDTH)
    model.neck.conv_cfg = MOE
    model.roi_head.bbox_head.conv_cfg = MOE
    return model


def faster_rcnn_paths():
    return ConfigDict(type='MoEDetector', detector=stock_model_cfg(FASTER_RCNN, WIDTH),
                      moe_layers=[dict(paths=['rpn_head.rpn_conv',
                                              'roi_head.bbox_head.shared_convs.*.conv'],
                                       num_experts=3, balance_cfg=IMPORTANCE)])


CASES = {
    'RetinaNet + MoEFPN': stock_retinanet_with_moe_fpn,
    'FasterRCNN + conv_cfg': stock_faster_rcnn_with_conv_cfg,
    'MoEDetector(FasterRCNN) paths': faster_rcnn_paths,
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_balance_losses_reach_the_loss_dict_of_stock_detectors(case):
    """Defect: MoE layers inside a stock detector class had their balance losses
    silently dropped. The reference: the importance loss of each MoE module's gate
    rows of this step, recomputed from the recorded gate weights."""
    model = build_model(CASES[case]())
    assert type(model).__module__.startswith('mmdet.models')  # the stock class itself
    moe_modules = [m for m in model.modules() if is_moe_module(m)]
    assert moe_modules
    with record_gates(model) as recorder:
        losses, _ = one_training_step(model, batch_size=2, image_size=96)
    want = sum(0.5 * importance_loss(torch.cat([r.weights for r in records]))
               for records in recorder.by_layer().values())
    torch.testing.assert_close(losses['loss_moe_importance'], want)
    gate = moe_modules[0].gate
    assert gate.w_gate.weight.grad is not None and gate.w_gate.weight.grad.abs().sum() > 0
    # collected once: the next step starts afresh
    assert all(not m._gate_outputs for m in moe_modules)


def test_stock_detector_without_moe_is_unchanged():
    model = build_model(stock_model_cfg(RETINANET, WIDTH))
    losses, _ = one_training_step(model)
    assert set(losses) == {'loss_cls', 'loss_bbox'}


def test_moe_detectors_pickle_and_torch_save():
    """Defect: the class that with_moe_losses built could not be imported by name."""
    for cfg in (faster_rcnn_paths(), ConfigDict(
            stock_retinanet_with_moe_fpn(), type='MoERetinaNet')):
        model = build_model(cfg).eval()
        restored = pickle.loads(pickle.dumps(model))
        assert type(restored) is type(model)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        reloaded = torch.load(buffer, weights_only=False)
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            for a, b in zip(model.extract_feat(x), reloaded.extract_feat(x), strict=True):
                torch.testing.assert_close(a, b)


def test_forward_of_detectors_and_trackers_collects_once_and_direct_loss_is_stock():
    """forward(mode='loss') of a detector (the runner's train_step) or of a tracker
    wrapping one has the MoE losses, summed once; loss() called directly is mmdet's
    own, and add_moe_losses completes it the same way."""
    model = build_model(ConfigDict(stock_retinanet_with_moe_fpn(), type='MoERetinaNet'))
    _, data = one_training_step(model, batch_size=2, image_size=96)
    torch.manual_seed(0)  # the gates' noise
    with record_gates(model) as recorder:
        losses = model(data['inputs'], data['data_samples'], mode='loss')
    want = sum(0.5 * importance_loss(torch.cat([r.weights for r in records]))
               for records in recorder.by_layer().values())
    torch.testing.assert_close(losses['loss_moe_importance'], want)
    torch.manual_seed(0)
    direct = model.loss(data['inputs'], data['data_samples'])
    assert 'loss_moe_importance' not in direct
    add_moe_losses(model, direct)
    torch.testing.assert_close(direct['loss_moe_importance'], want)
    tracker = build_model(dict(type='ByteTrack', detector=stock_retinanet_with_moe_fpn()))
    assert 'loss_moe_importance' in tracker(data['inputs'], data['data_samples'],
                                            mode='loss')


def test_detector_classes_defined_later_collect_too():
    from mmdet.models.detectors import RetinaNet

    class MyRetinaNet(RetinaNet):
        def loss(self, inputs, data_samples):
            losses = super().loss(inputs, data_samples)
            losses['loss_extra'] = losses['loss_cls'] * 0
            return losses

    cfg = stock_retinanet_with_moe_fpn()
    cfg.pop('type')
    model = MyRetinaNet(**cfg)
    losses, _ = one_training_step(model, batch_size=2, image_size=96)
    assert {'loss_extra', 'loss_moe_importance'} <= set(losses)
