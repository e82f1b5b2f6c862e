"""mmdet's inference API (init_detector, inference_detector, DetInferencer) on every
provided config, with random weights and with a checkpoint."""
import glob
import json
import os.path as osp

import numpy as np
import pytest
import torch
from helpers import CONFIGS, TOY_MOE_CONFIG, redraw_parameters
from mmengine.config import Config
from mmengine.runner import save_checkpoint

from mmdet.apis import DetInferencer, inference_detector, init_detector

pytestmark = pytest.mark.slow

ALL_CONFIGS = sorted(glob.glob(osp.join(CONFIGS, '*', '*.py')))
IMAGE = (np.random.RandomState(0).rand(96, 128, 3) * 255).astype(np.uint8)


def small_test_scale(path: str) -> Config:
    """The config with its test-time Resize shrunk: the COCO models run in seconds."""
    cfg = Config.fromfile(path)
    for step in cfg.test_dataloader.dataset.pipeline:
        if step.type == 'Resize':
            step.scale = (128, 96)
    return cfg


def tagging_heads(model) -> list:
    from mmdet.models.dense_heads.base_dense_head import BaseDenseHead
    from mmdet_moe.models import tags_detections
    return [m for m in model.modules() if isinstance(m, BaseDenseHead) and tags_detections(m)]


def check_tags(model, pred) -> None:
    """Detections of a head that tags them keep their FPN level and gate weights."""
    heads = tagging_heads(model)
    if not heads:
        return
    assert {'levels', 'expert_weights'} <= set(pred.keys())
    weights = pred.expert_weights
    assert weights.shape[0] == len(pred.bboxes) and weights.dim() == 3
    assert (pred.levels >= 0).all() and (pred.levels < 5).all()
    if len(weights):
        assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:2]), atol=1e-5)


@pytest.mark.parametrize('path', ALL_CONFIGS, ids=lambda p: osp.relpath(p, CONFIGS))
def test_init_detector_and_inference_detector(path, tmp_path):
    """Random weights, then the same weights from a checkpoint: the same detections."""
    model = init_detector(small_test_scale(path), device='cpu')
    redraw_parameters(model, seed=1)
    result = inference_detector(model, IMAGE)
    pred = result.pred_instances
    assert result.ori_shape == (96, 128)
    assert len(pred.bboxes) == len(pred.scores) == len(pred.labels)
    check_tags(model, pred)
    ckpt = str(tmp_path / 'model.pth')
    save_checkpoint({'state_dict': model.state_dict()}, ckpt)
    loaded = init_detector(small_test_scale(path), ckpt, device='cpu')
    got = inference_detector(loaded, IMAGE).pred_instances
    assert set(got.keys()) == set(pred.keys())
    for key in pred.keys():
        torch.testing.assert_close(got[key], pred[key])


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A toy MoE detector with non-trivial weights saved as mmengine saves it."""
    model = init_detector(TOY_MOE_CONFIG, device='cpu')
    redraw_parameters(model, seed=1)
    path = tmp_path_factory.mktemp('ckpt') / 'toy_moe.pth'
    save_checkpoint({'state_dict': model.state_dict(),
                     'meta': {'dataset_meta': model.dataset_meta}}, str(path))
    return model.eval(), str(path)


def test_init_detector_loads_the_checkpoint(checkpoint):
    model, path = checkpoint
    loaded = init_detector(TOY_MOE_CONFIG, path, device='cpu')
    expected = inference_detector(model, IMAGE).pred_instances
    got = inference_detector(loaded, IMAGE).pred_instances
    assert len(expected) > 0
    for key in ('bboxes', 'scores', 'labels', 'levels', 'expert_weights'):
        torch.testing.assert_close(got[key], expected[key])


def test_det_inferencer_as_image_demo_calls_it(checkpoint, tmp_path):
    """mmdet's demo/image_demo.py is DetInferencer(model, weights, device) called on
    an image path with out_dir; the same here, results and visualisation checked."""
    import mmcv
    model, path = checkpoint
    image = str(tmp_path / 'image.png')  # lossless: the file holds IMAGE exactly
    mmcv.imwrite(IMAGE, image)
    inferencer = DetInferencer(model=TOY_MOE_CONFIG, weights=path, device='cpu')
    expected = inference_detector(model, IMAGE).pred_instances
    out = inferencer(image, out_dir=str(tmp_path / 'out'), pred_score_thr=0.0,
                     no_save_pred=False)
    with open(tmp_path / 'out' / 'preds' / 'image.json') as f:
        saved = json.load(f)
    np.testing.assert_allclose(saved['bboxes'], expected.bboxes.numpy(), rtol=1e-5)
    assert out['predictions'][0]['labels'] == expected.labels.tolist()
    assert osp.isfile(tmp_path / 'out' / 'vis' / 'image.png')
    # the data samples DetInferencer returns on request keep the expert tags
    sample = inferencer(image, return_datasamples=True)['predictions'][0]
    check_tags(inferencer.model, sample.pred_instances)
    torch.testing.assert_close(sample.pred_instances.expert_weights, expected.expert_weights)
