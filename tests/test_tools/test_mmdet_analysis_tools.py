"""mmdet 3.3.0's own analysis tools (``mmdet/.mim/tools/analysis_tools/``), run as a
user runs them, unmodified, on the toy data and a MoE RetinaNet: each one works with
the set-up's packages (extra ``tools``) and loads ``mmdet_moe`` through the config's
``custom_imports`` alone, and writes or prints what it should."""
import ast
import json
import os
import os.path as osp
import pickle
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from helpers import (TOY_MOE_CONFIG, as_cli_options, build_model, load_config,
                     make_tiny_coco, run_tool, toy_overrides)
from mmdet_moe.stock_tools import stock_tool_path

pytestmark = pytest.mark.slow


def run_analysis_tool(name, *args, cwd):
    """``python mmdet/.mim/tools/analysis_tools/<name> ARGS`` with the venv's Python
    (no ``mmdet_moe`` import other than the config's), headless matplotlib."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', MPLBACKEND='Agg')
    script = stock_tool_path(osp.join('analysis_tools', name))
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f'{name} failed:\n{output[-3000:]}'
    return output


def metrics_of(line_prefix, text):
    """``{'coco/bbox_mAP': 0.0, ...}`` from a log line of ``key: value`` pairs."""
    line = [ln for ln in text.splitlines() if line_prefix in ln and 'coco/' in ln][-1]
    return {k: float(v) for k, v in re.findall(r'(coco/\S+): (-?[0-9.]+)', line)}


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """Tiny toy COCO (4 train, 2 val images of 64 px); one epoch (2 iterations) of the
    MoE RetinaNet through tools/train.py (checkpoint, JSON log with a validation);
    tools/test.py --out results.pkl; and an oracle results file (the val GT boxes as
    detections with score 1)."""
    root = tmp_path_factory.mktemp('mmdet_analysis_tools')
    data = make_tiny_coco(root / 'data', train=4, val=2, size=64)
    # score_thr 0: the untrained model's scores are tiny; with it the validation and
    # the test give COCO metrics and the results file holds detections
    options = as_cli_options(dict(toy_overrides(data), **{'model.test_cfg.score_thr': 0.0}))
    work = root / 'work'
    proc = run_tool('train.py', TOY_MOE_CONFIG, '--work-dir', work, *options)
    assert proc.returncode == 0, proc.output[-3000:]
    json_log, = work.glob('*/vis_data/2*.json')
    results = root / 'results.pkl'
    proc = run_tool('test.py', TOY_MOE_CONFIG, work / 'epoch_1.pth', '--work-dir',
                    root / 'test', '--out', results, *options)
    assert proc.returncode == 0, proc.output[-3000:]
    test_metrics = metrics_of('Epoch(test)', proc.output)
    assert 'coco/bbox_mAP' in test_metrics, proc.output[-3000:]

    with open(osp.join(data, 'val.json')) as f:
        val = json.load(f)
    classes = load_config(TOY_MOE_CONFIG).metainfo['classes']
    label = {c['id']: classes.index(c['name']) for c in val['categories']}
    with open(results, 'rb') as f:
        predictions = pickle.load(f)
    assert 'expert_weights' in predictions[0]['pred_instances']  # the MoE head's fields
    for pred in predictions:
        anns = [a for a in val['annotations'] if a['image_id'] == pred['img_id']]
        pred['pred_instances'] = dict(
            bboxes=torch.tensor([[x, y, x + w, y + h] for x, y, w, h in
                                 (a['bbox'] for a in anns)]),
            scores=torch.ones(len(anns)),
            labels=torch.tensor([label[a['category_id']] for a in anns]))
    oracle = root / 'oracle.pkl'
    with open(oracle, 'wb') as f:
        pickle.dump(predictions, f)
    return SimpleNamespace(root=root, data=data, options=options, work=work,
                           json_log=json_log, results=results, oracle=oracle,
                           test_metrics=test_metrics, val=val)


def test_analyze_logs_train_time_and_curves(toy, tmp_path):
    lines = [json.loads(line) for line in toy.json_log.read_text().splitlines()]
    train = [line for line in lines if 'epoch' in line]
    assert len(train) == 2 and any('coco/bbox_mAP' in line for line in lines)
    output = run_analysis_tool('analyze_logs.py', 'cal_train_time', toy.json_log,
                               cwd=tmp_path)
    # first iteration of the epoch left out as an outlier
    expected = np.mean([line['time'] for line in train[1:]])
    assert f'average iter time: {expected:.4f} s/iter' in output
    assert 'slowest epoch 1' in output
    fig = tmp_path / 'fig.png'
    keys = ('bbox_mAP', 'loss_cls', 'loss_moe_importance')  # per epoch, per iteration
    output = run_analysis_tool('analyze_logs.py', 'plot_curve', toy.json_log, '--keys',
                               *keys, '--out', fig, cwd=tmp_path)
    for key in keys:
        assert f'metric is {key}' in output
    assert f'save curve to: {fig}' in output
    image = imread(fig)
    assert image.shape[:2] == (480, 640) and image.std() > 0


def test_get_flops_counts_the_moe_detector(toy, tmp_path):
    from mmengine.analysis.print_helper import _format_size
    output = run_analysis_tool('get_flops.py', TOY_MOE_CONFIG, '--num-images', 1,
                               *toy.options, cwd=tmp_path)
    model = build_model(load_config(TOY_MOE_CONFIG).model)
    params = sum(p.numel() for p in model.parameters())
    assert f'Params: {_format_size(params)}\n' in output  # every expert counted
    assert 'Input shape: (256, 256)' in output  # the config's Resize of the 64-px images
    flops = re.search(r'Flops: ([0-9.]+)([KMGT]?)\n', output)
    assert flops and float(flops.group(1)) > 0, output[-3000:]


def test_browse_dataset_draws_every_training_image(toy, tmp_path):
    out = tmp_path / 'browse'
    run_analysis_tool('browse_dataset.py', TOY_MOE_CONFIG, '--output-dir', out,
                      '--not-show', *toy.options, cwd=tmp_path)
    with open(osp.join(toy.data, 'train.json')) as f:
        names = sorted(osp.basename(img['file_name']) for img in json.load(f)['images'])
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:  # after the training pipeline's Resize to 256 px
        assert imread(out / name).shape == (256, 256, 3)


def test_confusion_matrix_from_test_results(toy, tmp_path):
    run_analysis_tool('confusion_matrix.py', TOY_MOE_CONFIG, toy.results, tmp_path / 'cm',
                      '--score-thr', 0, *toy.options, cwd=tmp_path)
    image = imread(tmp_path / 'cm' / 'confusion_matrix.png')
    assert image.ndim == 3 and min(image.shape[:2]) > 300 and image.std() > 0


def test_eval_metric_repeats_test_py_and_scores_the_oracle_1(toy, tmp_path):
    def evaluate(results):
        output = run_analysis_tool('eval_metric.py', TOY_MOE_CONFIG, results,
                                   *toy.options, cwd=tmp_path)
        printed = next(line for line in output.splitlines()
                       if line.startswith("{'coco/bbox_mAP'"))
        return ast.literal_eval(printed)

    offline = evaluate(toy.results)
    assert set(offline) == set(toy.test_metrics)
    for key, value in toy.test_metrics.items():  # test.py logs 4 decimals
        assert offline[key] == pytest.approx(value, abs=5e-5), key
    oracle = evaluate(toy.oracle)
    assert oracle['coco/bbox_mAP'] == oracle['coco/bbox_mAP_50'] == 1.0


def test_analyze_results_saves_best_and_worst_images(toy, tmp_path):
    out = tmp_path / 'ar'
    run_analysis_tool('analyze_results.py', TOY_MOE_CONFIG, toy.results, out, '--topk', 1,
                      *toy.options, cwd=tmp_path)
    maps = {}
    val_names = {osp.splitext(osp.basename(img['file_name']))[0]
                 for img in toy.val['images']}
    for kind in ('good', 'bad'):
        image, = (out / kind).glob('*.png')
        stem, value = re.fullmatch(r'(.+)_(-?[0-9.]+)\.png', image.name).groups()
        assert stem in val_names
        maps[kind] = float(value)
        assert imread(image).shape == (64, 64, 3)  # drawn on the original image
    assert 0 <= maps['bad'] <= maps['good'] <= 1


def test_benchmark_dataloader_and_dataset(toy, tmp_path):
    common = ('--max-iter', 2, '--num-warmup', 1, '--log-interval', 1)
    # the default task: the test loader's 2 images, one per batch
    output = run_analysis_tool('benchmark.py', TOY_MOE_CONFIG, *common, *toy.options,
                               'test_dataloader.batch_size=1', cwd=tmp_path)
    fps = re.search(r'Overall fps: ([0-9.]+) batch/s, times per batch: [0-9.]+ ms/batch, '
                    r'batch size: 1, num_workers: 0', output)
    assert fps and float(fps.group(1)) > 0, output[-3000:]
    assert '(GB) mem_used:' in output  # psutil's memory report
    output = run_analysis_tool('benchmark.py', TOY_MOE_CONFIG, '--task', 'dataset',
                               *common, *toy.options, cwd=tmp_path)
    fps = re.search(r'Overall fps: ([0-9.]+) img/s', output)
    assert fps and float(fps.group(1)) > 0, output[-3000:]
    for transform in ('LoadImageFromFile', 'Resize', 'PackDetInputs'):
        assert re.search(rf'{transform} - [0-9.]+ ms', output), transform
