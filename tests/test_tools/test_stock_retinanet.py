"""A stock RetinaNet (ResNet-18, no pretrained weights) trains a step and predicts on CPU."""
import torch
from mmdet.registry import MODELS

from helpers import TOY_BASE_CONFIG, load_config, one_training_step, predict


def test_stock_retinanet_r18_loss_backward_and_predict():
    cfg = load_config(TOY_BASE_CONFIG)
    assert cfg.model.backbone.depth == 18 and cfg.model.backbone.init_cfg is None
    model = MODELS.build(cfg.model)
    model.init_weights()
    losses, _ = one_training_step(model)
    assert {'loss_cls', 'loss_bbox'} <= set(losses)
    assert all(torch.isfinite(torch.stack(v)).all() if isinstance(v, list)
               else torch.isfinite(v) for v in losses.values())
    assert model.bbox_head.retina_cls.weight.grad.abs().sum() > 0
    results = predict(model)
    assert len(results) == 2
    assert results[0].pred_instances.bboxes.shape[1] == 4
