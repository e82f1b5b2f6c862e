"""ExpertSizeStatsHook under test-time augmentation (tools/test.py --tta): one merged
record per original image, each detection with the gate weights of the view that
produced it, or a clear refusal; never gate rows of views taken as FPN levels."""
import copy
import json

import numpy as np
import pytest
import torch
from helpers import (TOY_MOE_CONFIG, as_cli_options, make_tiny_coco, redraw_parameters,
                     run_tool, toy_overrides)
from mmengine.config import ConfigDict
from mmengine.model import BaseModel
from mmengine.runner import save_checkpoint
from mmengine.structures import InstanceData

from mmdet.models.test_time_augs import DetTTAModel
from mmdet.structures import DetDataSample
from mmdet_moe.engine.hooks.gate_rows import LayerRows
from mmdet_moe.models import MoEDetTTAModel

class Detector(BaseModel):
    """Stands in for the wrapped detector: only the merge runs here."""

    def forward(self, *args, **kwargs):
        raise NotImplementedError


TTA_CFG = ConfigDict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=7)


def view(flip: bool, seed: int, num: int = 12) -> DetDataSample:
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(num, 2, generator=gen) * 60
    sample = DetDataSample(metainfo=dict(img_id=0, ori_shape=(80, 100), img_shape=(80, 100),
                                         flip=flip, flip_direction='horizontal'))
    sample.pred_instances = InstanceData(
        bboxes=torch.cat([xy, xy + 5 + torch.rand(num, 2, generator=gen) * 30], 1),
        scores=torch.rand(num, generator=gen), labels=torch.randint(0, 3, (num,), generator=gen),
        levels=torch.randint(0, 5, (num,), generator=gen),
        expert_weights=torch.rand(num, 1, 4, generator=gen),
        source=torch.arange(num) + 100 * seed)
    return sample


def test_merge_is_det_tta_models_and_keeps_the_tags():
    views = [view(False, 0), view(True, 1)]
    stock = DetTTAModel(module=Detector(), tta_cfg=TTA_CFG)._merge_single_sample(
        copy.deepcopy(views)).pred_instances
    ours = MoEDetTTAModel(module=Detector(), tta_cfg=TTA_CFG)._merge_single_sample(
        copy.deepcopy(views)).pred_instances
    for key in ('bboxes', 'scores', 'labels'):
        torch.testing.assert_close(ours[key], stock[key])
    assert len(ours) == 7
    # every kept detection carries the tags of the one it came from, and its view
    for i, source in enumerate(ours.source.tolist()):
        v = source // 100
        original = views[v].pred_instances
        j = source % 100
        assert ours.views[i] == v
        assert ours.levels[i] == original.levels[j] and ours.labels[i] == original.labels[j]
        torch.testing.assert_close(ours.expert_weights[i], original.expert_weights[j])
        torch.testing.assert_close(ours.scores[i], original.scores[j])


def test_detection_rows_are_those_of_the_view_and_level():
    rows = np.random.RandomState(0).rand(2, 3, 4, 5)  # views, levels, images, experts
    layer = LayerRows(rows, per_level=True)
    levels, views = np.array([0, 2, 1]), np.array([1, 0, 1])
    np.testing.assert_array_equal(layer.detection_rows(3, levels, views, 3),
                                  rows[views, levels, 3])
    np.testing.assert_allclose(layer.call_rows(3), rows[:, :, 3].mean(0))
    np.testing.assert_allclose(layer.image_row(3), rows[:, :, 3].mean((0, 1)))


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """Tiny toy data, a toy MoE checkpoint with scores spread out, and the options."""
    from mmdet.apis import init_detector
    root = tmp_path_factory.mktemp('tta')
    data = make_tiny_coco(root / 'data', train=2, val=3)
    model = init_detector(TOY_MOE_CONFIG, device='cpu')
    redraw_parameters(model, seed=1)
    ckpt = str(root / 'ckpt.pth')
    save_checkpoint({'state_dict': model.state_dict(),
                     'meta': {'dataset_meta': model.dataset_meta}}, ckpt)
    options = toy_overrides(data)
    options.update({'model.test_cfg.score_thr': 0.0, 'custom_hooks.0.score_thr': 0.0})
    return root, ckpt, options


@pytest.mark.slow
def test_stock_tta_model_is_refused(setup, tmp_path):
    root, ckpt, options = setup
    proc = run_tool('test.py', TOY_MOE_CONFIG, ckpt, '--tta', '--work-dir', tmp_path,
                    *as_cli_options(dict(options, **{'tta_model.type': 'DetTTAModel'})))
    assert proc.returncode != 0
    assert 'MoEDetTTAModel' in proc.output and 'DetTTAModel' in proc.output
    assert not (tmp_path / 'expert_size_stats.json').exists()


def stats_of(setup, work_dir, *args, config=TOY_MOE_CONFIG):
    _, ckpt, options = setup
    proc = run_tool('test.py', config, ckpt, '--work-dir', work_dir, *args,
                    *as_cli_options(options))
    assert proc.returncode == 0, proc.output[-3000:]
    with open(work_dir / 'expert_size_stats.json') as f:
        return json.load(f)


@pytest.mark.slow
def test_tta_statistics_are_per_original_image(setup, tmp_path):
    """The gate rows of the TTA run are the mean of the two views' rows, each view run
    on its own (the plain test pipeline, and the same with the image flipped)."""
    flipped = tmp_path / 'flipped.py'
    flipped.write_text(
        f'_base_ = {TOY_MOE_CONFIG!r}\n'
        'test_dataloader = dict(dataset=dict(pipeline=[\n'
        '    dict(type="LoadImageFromFile"),\n'
        '    dict(type="Resize", scale=(256, 256), keep_ratio=True),\n'
        '    dict(type="RandomFlip", prob=1.0),\n'
        '    dict(type="LoadAnnotations", with_bbox=True),\n'
        '    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape",\n'
        '         "img_shape", "scale_factor", "flip", "flip_direction"))]))\n')
    tta = stats_of(setup, tmp_path / 'tta', '--tta')
    plain = stats_of(setup, tmp_path / 'plain')
    mirrored = stats_of(setup, tmp_path / 'flip', config=str(flipped))
    assert tta['num_images'] == plain['num_images'] == 3
    assert tta['num_detections'] > 0
    (name,) = tta['layers']
    got, a, b = (s['layers'][name] for s in (tta, plain, mirrored))
    assert got['rows'] == a['rows'] == 3 * 5  # images × FPN levels, not × views
    np.testing.assert_allclose(got['importance'], (np.array(a['importance']) +
                                                   np.array(b['importance'])) / 2, rtol=1e-5)
    for key in ('levels', 'image'):
        np.testing.assert_allclose(got[key]['mass'], (np.array(a[key]['mass']) +
                                                      np.array(b[key]['mass'])) / 2, rtol=1e-5)
    # each kept detection has one gate row of its view: top-2 weights summing to 1
    mass = np.array(got['detection']['mass'])
    count = np.array(got['detection']['count'])
    assert mass.sum() == pytest.approx(tta['num_detections'], rel=1e-5)
    assert count.sum() == 2 * tta['num_detections']
