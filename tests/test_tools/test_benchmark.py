"""tools/benchmark.py: its subcommands run and print what they measure."""
import os.path as osp
import re

import pytest
import torch

from helpers import (CONFIGS, TOOLS, TOY_MOE_CONFIG, as_cli_options, make_tiny_coco, run_tool,
                     toy_overrides)

pytestmark = pytest.mark.slow


def run_on_tiny_toy(tmp_path, command, *args, train=6, val=1):
    """``benchmark.py COMMAND <toy MoE config> ARGS`` on a tiny toy dataset."""
    data = make_tiny_coco(tmp_path / 'data', train=train, val=val, size=64)
    proc = run_tool('benchmark.py', command, TOY_MOE_CONFIG, *args, '--work-dir',
                    tmp_path / 'work', *as_cli_options(toy_overrides(data, batch_size=2)))
    assert proc.returncode == 0, proc.output[-3000:]
    return proc


def test_iteration_profile_splits_the_wall_time(tmp_path):
    proc = run_on_tiny_toy(tmp_path, 'iteration', '--iters', 2, '--warmup', 1)
    rows = {phase: float(ms) for phase, ms, _ in re.findall(
        r'^\| (\S.*?) +\| +([0-9.]+) \| +([0-9.]+)% \|$', proc.stdout, re.MULTILINE)}
    for phase in ('forward (model + losses)', 'backward', 'data preprocessor',
                  'optimizer step (grad clip included)', 'hook ExpertUtilisationHook',
                  'data loading (rest of the iteration)', 'iteration (wall)'):
        assert phase in rows, phase
    wall = rows.pop('iteration (wall)')
    assert all(ms >= 0 for ms in rows.values())
    assert sum(rows.values()) == pytest.approx(wall, rel=1e-2, abs=0.3)
    assert '2 training iterations after 1 warm-up, batch 2' in proc.stdout


def test_sweep_prints_the_cost_against_the_number_of_experts():
    proc = run_tool('benchmark.py', 'sweep', '--channels', 8, '--size', 8, '--batch', 2,
                    '--experts', 4, 8, '--mu-experts', 4, 16, '--repeats', 1, '--no-memory')
    assert proc.returncode == 0, proc.output[-3000:]
    rows = re.findall(r'^\| (\S.*?) +\| +([0-9.]+)× \| +([0-9.]+)× \| ([0-9.]+) \|$',
                      proc.stdout, re.MULTILINE)
    assert [r[0] for r in rows] == ['fused', 'dispatch', 'dispatch, capacity 1.25',
                                    'per location, dispatch', 'per location, dense',
                                    'dispatch', 'dispatch, capacity 1.25',
                                    'per location (all N, mixed)',
                                    'gate=image', 'gate=pixel']
    for _, first, last, ratio in rows:
        first, last = float(first), float(last)
        rounding = 0.006 + 0.005 * (1 / first + last / first ** 2)  # of the printed figures
        assert float(ratio) == pytest.approx(last / first, abs=rounding)
    for title in ('MoEConv2d (× dense conv)', 'subnet experts, 2 × conv3×3+ReLU (× one subnet)',
                  'CP μMoE conv, rank matched to dense (× dense conv)'):
        assert f'\n{title}: reference ' in proc.stdout
    assert 'N=16 / N=4' in proc.stdout and 'on cpu' in proc.stdout


def test_layers_prints_every_layer_against_the_dense_conv():
    proc = run_tool('benchmark.py', 'layers', '--channels', 8, '--size', 8, '--batch', 2,
                    '--num-experts', 4, '--mu-experts', 8, '--repeats', 1)
    assert proc.returncode == 0, proc.output[-3000:]
    names = re.findall(r'^\| (\S.*?) +\| +[0-9,]+ \| +[0-9.]+ \| +[0-9.]+ \|$', proc.stdout,
                       re.MULTILINE)
    assert names[0] == 'Conv2d 3×3 (dense reference)' and len(names) == 8, proc.stdout
    assert 'MoEConv2d N=4 k=2 per location, impl=dispatch' in names


def test_sweep_peak_memory_of_a_variant_in_a_process_of_its_own():
    """What the sweep runs per variant on a CPU: its peak RSS, larger for more experts."""
    common = ['--channels', 64, '--size', 8, '--batch', 2, '--experts', 4, 64]
    peaks = []
    for n in (4, 64):  # table 0, row 0: fused MoEConv2d, 64·64·9·N float32 weights
        proc = run_tool('benchmark.py', 'sweep', '--memory-of', 0, 0, n, *common)
        assert proc.returncode == 0, proc.output[-3000:]
        peaks.append(float(proc.stdout.strip().splitlines()[-1]))
    assert 100 < peaks[0] < peaks[1]  # torch's own footprint and more
    assert peaks[1] - peaks[0] > 60 * 64 * 64 * 9 * 4 / 2**20  # weights (+ grads) of 60 experts


@pytest.mark.parametrize('args, message', [
    (['--device', 'tpu'], "invalid choice: 'tpu'"),
    pytest.param(['--device', 'cuda'], '--device cuda: no CUDA GPU', marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason='a GPU is available')),
    (['--experts', '4'], 'at least two numbers of experts'),
    (['--experts', '1', '4'], '>= --top-k 2'),
    (['--mu-experts', '1', '4'], '--mu-experts [1, 4]: at least two numbers of experts'),
    (['--capacity-factor', '0'], '--capacity-factor: capacity_factor must be a finite number '
                                 '> 0 (each expert takes ceil(capacity_factor · B · top_k / '
                                 'num_experts) rows per call) or None (every routed row runs), '
                                 'got 0.0'),
    (['--capacity-factor', '-1.5'], 'got -1.5'),
])
def test_bad_arguments_exit_with_code_2(args, message):
    proc = run_tool('benchmark.py', 'sweep', *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.output[-2000:]


def test_hooks_overhead_in_training_and_test(tmp_path):
    proc = run_on_tiny_toy(tmp_path, 'hooks', '--iters', 2, '--test-images', 2, train=4, val=2)
    rows = re.findall(r'^\| (\w+) +\| (train|test) +\| +([0-9.]+) \| +([0-9.]+) \| '
                      r'+(-?[0-9.]+)% \|$', proc.stdout, re.MULTILINE)
    assert [(r[0], r[1]) for r in rows] == [('ExpertUtilisationHook', 'train'),
                                            ('ExpertSizeStatsHook', 'test')]
    for _, _, loop_s, hook_ms, overhead in rows:
        loop_s, hook_ms = float(loop_s), float(hook_ms)
        assert 0 < hook_ms / 1e3 < loop_s
        assert float(overhead) == pytest.approx(100 * hook_ms / (1e3 * loop_s - hook_ms),
                                                rel=0.05, abs=0.02)
    assert (tmp_path / 'work' / 'test').is_dir()  # the test run's statistics went there


def test_detector_compute_counts_k_and_n_towers(monkeypatch):
    """Per variant, params and FLOPs per image: the subnet MoE (N=4, k=2) runs what the
    dense k=2 reference runs, except its gate's logits for 4 experts instead of 2."""
    monkeypatch.syspath_prepend(TOOLS)  # where tools/benchmark.py finds its subjects
    from benchmarks.detectors import DetectorStep, detector_compute
    variants = ['stock RetinaNet', 'k=2 cls subnets, dense', 'cls subnet experts N=4 k=2']
    rows = detector_compute({v: DetectorStep(v, 1, 64) for v in variants})
    stock, dense, moe = rows
    assert [r['variant'] for r in rows] == variants
    assert stock['flops_k'] == stock['flops_n'] and dense['flops_k'] == dense['flops_n']
    # the gate's logits (64 channels, 5 levels) for 2 more experts
    assert moe['flops_k'] - dense['flops_k'] == 5 * 64 * 2
    gate = 5 * 64 * 4
    tower = moe['flops_k'] - stock['flops_k'] - gate  # k = 2 towers for the stock one
    assert moe['flops_n'] - stock['flops_n'] == 3 * tower + gate
    # per row 2 of 4 towers, as the dense pair; its noisy gate has 2 more outputs
    assert moe['params_active'] - dense['params_total'] == 2 * (64 * 2 + 2)


def test_export_times_eager_against_onnxruntime_and_the_merged_dense_model():
    pytest.importorskip('onnxruntime')
    proc = run_tool('benchmark.py', 'export', osp.join(CONFIGS, 'toy',
                                                       'fcos_r18_fpn_moe-head_4e_toy-coco.py'),
                    '--shape', 64, 64, '--repeats', 1, '--warmup', 0)
    assert proc.returncode == 0, proc.output[-3000:]
    rows = re.findall(r'^\| (\S.*?) \| ([0-9.]+) \| ([0-9.]+) \|$', proc.stdout, re.MULTILINE)
    assert [r[0] for r in rows] == ['MoE, eager PyTorch', 'MoE, onnxruntime',
                                    'dense (merged), eager PyTorch',
                                    'dense (merged), onnxruntime']
    assert rows[0][2] == '1.00'
