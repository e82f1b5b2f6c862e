"""Two ranks (gloo) give the same totals as one process, with an odd image count."""
import json
import os

import numpy as np
import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.dataset import DefaultSampler
from mmengine.structures import InstanceData

from helpers import run_on_two_gloo_ranks
from mmdet_moe.engine.hooks import ExpertSizeStatsHook
from mmdet_moe.engine.hooks.gate_rows import rows_by_layer
from mmdet_moe.engine.hooks.ground_truth import GroundTruth
from mmdet_moe.layers import GateRecorder

pytestmark = pytest.mark.slow

NUM_IMAGES = 5  # odd: the sampler pads rank 1 with a repeat of image 0


class Dataset:
    metainfo = dict(classes=('a', 'b'))

    def __len__(self):
        return NUM_IMAGES


def image(index):
    """A deterministic image: 3 detections of growing size and a 2-expert gate row."""
    rng = np.random.default_rng(index)
    sides = rng.uniform(5, 150, 3)
    s = DetDataSample(metainfo=dict(img_id=100 + index, scale_factor=(1.0, 1.0)))
    s.pred_instances = InstanceData(
        bboxes=torch.tensor([[0, 0, a, a] for a in sides], dtype=torch.float),
        scores=torch.tensor(rng.uniform(0.4, 1, 3), dtype=torch.float),
        labels=torch.tensor(rng.integers(0, 2, 3)), levels=torch.tensor([0, 1, 1]))
    s.gt_instances = InstanceData(bboxes=torch.tensor([[0, 0, sides[0], sides[0]]],
                                                      dtype=torch.float),
                                  labels=torch.tensor([1]))
    gate = torch.tensor(rng.dirichlet([1, 1], size=2), dtype=torch.float)  # (levels, 2)
    return s, gate


def run_hook(indices):
    hook = ExpertSizeStatsHook(score_thr=0.5, shuffle_permutations=2)
    hook.layer_names, hook._classes = ['head'], ['a', 'b']
    hook._dataset, hook._gt = Dataset(), GroundTruth(Dataset())
    for index in indices:  # batches of one image
        sample, gate = image(index)
        recorder = GateRecorder()
        for level in range(2):
            recorder.add('head', gate[level:level + 1], level=level)
        hook._images.append(hook._image_record(0, sample, rows_by_layer(recorder)))
    return hook.gather_and_summarise('test', 0, 0)


def worker(rank, out_dir):
    sampler = DefaultSampler(Dataset(), shuffle=False)  # reads rank/world from dist
    stats = run_hook(list(sampler))
    if rank == 0:
        with open(os.path.join(out_dir, 'stats.json'), 'w') as f:
            json.dump(stats, f)
    else:
        assert stats is None


def test_two_ranks_equal_one_process(tmp_path):
    run_on_two_gloo_ranks(worker, str(tmp_path))
    with open(tmp_path / 'stats.json') as f:
        two = json.load(f)
    one = json.loads(json.dumps(run_hook(range(NUM_IMAGES))))
    assert two['num_images'] == one['num_images'] == NUM_IMAGES
    for key in ('num_detections', 'gt_per_bucket'):
        assert two[key] == one[key]
    for view in ('detection', 'classes', 'image', 'levels'):
        for part, value in one['layers']['head'][view].items():
            np.testing.assert_allclose(two['layers']['head'][view][part], value, rtol=1e-6)
    np.testing.assert_allclose(two['layers']['head']['importance'],
                               one['layers']['head']['importance'], rtol=1e-6)
