"""tools/gpu_check.sh: without a GPU it says it skipped and exits 0; with a GPU (a fake
``nvidia-smi`` listing one) ``--dry-run`` prints the steps it would run."""
import os
import os.path as osp
import subprocess

import pytest
import torch

from helpers import ROOT, TOOLS

SCRIPT = osp.join(TOOLS, 'gpu_check.sh')

pytestmark = pytest.mark.slow  # starts bash (and, in it, Python with torch)


def fake_nvidia_smi(folder, listing: str, status: int):
    """An ``nvidia-smi`` in ``folder`` whose ``-L`` prints ``listing`` and exits ``status``."""
    path = folder / 'nvidia-smi'
    path.write_text(f'#!/bin/sh\nprintf "%s" "{listing}"\nexit {status}\n')
    path.chmod(0o755)
    return str(folder)


def run_script(tmp_path, bin_dir, *args):
    env = {k: v for k, v in os.environ.items() if k != 'TORCH_INDEX_URL'}
    env.update(PATH=f'{bin_dir}:{os.environ["PATH"]}',
               VENV=str(tmp_path / 'no-venv'), GPU_CHECK_DIR=str(tmp_path / 'out'))
    return subprocess.run(['bash', SCRIPT, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is available')
@pytest.mark.parametrize('args', [(), ('--dry-run',)])
def test_without_a_gpu_it_skips_and_exits_0(tmp_path, args):
    bin_dir = fake_nvidia_smi(tmp_path, 'No devices were found\\n', 6)
    proc = run_script(tmp_path, bin_dir, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == '[gpu_check] no CUDA GPU found: skipped\n'
    assert not (tmp_path / 'out').exists()  # nothing set up or written


def test_with_a_gpu_dry_run_prints_the_steps(tmp_path):
    bin_dir = fake_nvidia_smi(tmp_path, 'GPU 0: Fake GPU (UUID: GPU-0)\\n', 0)
    proc = run_script(tmp_path, bin_dir, '--dry-run')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    venv, out = tmp_path / 'no-venv', tmp_path / 'out'
    steps = dict(line.split(None, 1) for line in proc.stdout.splitlines()
                 if line.startswith('  '))
    assert list(steps) == ['setup', 'card', 'pytest', 'sweep', 'demo']
    assert steps['setup'] == (f'VENV={venv} TORCH_INDEX_URL=https://download.pytorch.org'
                              '/whl/cu128 FORCE_CUDA=1 bash tools/setup_env.sh')
    assert steps['pytest'] == f'{venv}/bin/python -m pytest -m cuda -q -rs tests'
    assert steps['sweep'] == f'{venv}/bin/python tools/benchmark.py sweep --device cuda'
    assert steps['demo'] == f'{venv}/bin/python tools/demo.py --work-dir {out}/demo'
    assert not out.exists()  # a dry run runs nothing


def test_a_wrong_argument_is_named(tmp_path):
    proc = run_script(tmp_path, fake_nvidia_smi(tmp_path, '', 6), '--dryrun')
    assert proc.returncode == 2
    assert "unknown argument '--dryrun'; usage: bash tools/gpu_check.sh [--dry-run]" \
        in proc.stderr
