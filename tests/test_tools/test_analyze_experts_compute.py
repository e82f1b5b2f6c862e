"""tools/analyze_experts.py CONFIG CHECKPOINT: the report's active-compute section."""
import csv
import os.path as osp
import re
from types import SimpleNamespace

import pytest
import torch

from mmdet.structures import DetDataSample

from helpers import (CONFIGS, TOY_MOE_CONFIG, as_cli_options, build_model, load_config,
                     load_tool, make_tiny_coco, run_tool, toy_overrides)
from mmdet_moe.layers import count_active_compute

ROI_CONFIG = osp.join(CONFIGS, 'toy', 'faster-rcnn_r18_fpn_moe-roi-head_4e_toy-coco.py')

pytestmark = pytest.mark.slow


def test_report_holds_the_active_compute_of_the_model(tmp_path):
    data = make_tiny_coco(tmp_path / 'data', train=1, val=1, size=64)
    model = build_model(load_config(TOY_MOE_CONFIG).model)
    checkpoint = tmp_path / 'moe.pth'
    torch.save(dict(state_dict=model.state_dict()), checkpoint)
    out = tmp_path / 'report'
    proc = run_tool('analyze_experts.py', TOY_MOE_CONFIG, checkpoint, '--out-dir', out,
                    '--work-dir', tmp_path / 'work',
                    *as_cli_options(toy_overrides(data)))
    assert proc.returncode == 0, proc.output[-3000:]
    text = (out / 'report.md').read_text()
    assert '## Active compute' in text and "get_model_complexity_info" in text
    # the test pipeline resizes the 64-px image: its size is the one counted
    height, width = map(int, re.search(r'of a (\d+)×(\d+) image', text).groups())
    assert (height, width) != (64, 64)
    with open(out / 'active_compute.csv') as f:
        header, *rows = list(csv.reader(f))
    assert header[-2:] == ['FLOPs / image at k', 'FLOPs / image at N']
    want = count_active_compute(model, torch.zeros(1, 3, height, width)).rows()
    assert [r[0] for r in rows] == ['bbox_head.cls_moe', 'model']
    for row, expected in zip(rows, want, strict=True):
        numbers = {k: v for k, v in expected.items() if k.startswith(('params', 'flops'))}
        got = dict(zip(expected, row, strict=True))
        assert {k: float(got[k]) for k in numbers} == pytest.approx(numbers)
    assert 'active compute, ' in proc.stdout and '| bbox_head.cls_moe |' in proc.stdout


def test_compute_shape_needs_the_model(tmp_path):
    stats = tmp_path / 'stats.json'
    stats.write_text('{}')
    proc = run_tool('analyze_experts.py', stats, '--out-dir', tmp_path / 'r',
                    '--compute-shape', 64, 64)
    assert proc.returncode == 2 and '--compute-shape needs CONFIG CHECKPOINT' in proc.stderr


@pytest.mark.parametrize('shape', [None, [96, 128]])
def test_a_two_stage_detector_is_counted_with_its_data_samples(tmp_path, shape):
    """Faster R-CNN's tensor-mode forward runs the RPN's predict, which needs each
    image's metainfo: the count runs the model with data samples (the first test
    image's, or made for a zero image of ``--compute-shape``)."""
    analyze = load_tool('analyze_experts.py')
    model = build_model(load_config(ROI_CONFIG).model)
    runner = SimpleNamespace(model=model, test_loop=SimpleNamespace(
        dataloader=[dict(inputs=[torch.zeros(3, 64, 64, dtype=torch.uint8)],
                         data_samples=[DetDataSample(metainfo=dict(
                             img_shape=(64, 64), ori_shape=(64, 64), scale_factor=(1, 1),
                             pad_shape=(64, 64), batch_input_shape=(64, 64)))])]))
    compute = analyze.active_compute(runner, shape)
    assert compute['input_shape'] == tuple(shape or (64, 64))
    assert [row['layer'] for row in compute['rows']] == [
        'roi_head.bbox_head.shared_convs.2.conv', 'roi_head.bbox_head.shared_convs.3.conv',
        'model']
    assert all(row['flops_k'] > 0 for row in compute['rows'])
