"""tools/benchmark.py iteration: where a training iteration's time goes."""
import re

import pytest
import torch

from helpers import TOY_MOE_CONFIG, as_cli_options, make_tiny_coco, run_tool, toy_overrides


def test_iteration_profile_splits_the_wall_time(tmp_path):
    data = make_tiny_coco(tmp_path / 'data', train=6, val=1, size=64)
    options = toy_overrides(data, batch_size=2)
    proc = run_tool('benchmark.py', 'iteration', TOY_MOE_CONFIG, '--iters', 2, '--warmup', 1,
                    '--work-dir', tmp_path / 'work', *as_cli_options(options))
    assert proc.returncode == 0, proc.output[-3000:]
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
                    '--experts', 4, 8, '--repeats', 1)
    assert proc.returncode == 0, proc.output[-3000:]
    rows = re.findall(r'^\| (fused|dispatch) +\| +([0-9.]+)× \| +([0-9.]+)× \| ([0-9.]+) \|$',
                      proc.stdout, re.MULTILINE)
    assert [r[0] for r in rows] == ['fused', 'dispatch']
    assert 'on cpu' in proc.stdout


@pytest.mark.parametrize('args, message', [
    (['--device', 'tpu'], "invalid choice: 'tpu'"),
    pytest.param(['--device', 'cuda'], '--device cuda: no CUDA GPU', marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason='a GPU is available')),
    (['--experts', '4'], 'at least two numbers of experts'),
    (['--experts', '1', '4'], '>= --top-k 2'),
])
def test_bad_arguments_exit_with_code_2(args, message):
    proc = run_tool('benchmark.py', 'sweep', *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.output[-2000:]
