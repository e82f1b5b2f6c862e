"""tools/dist_train.sh and tools/dist_test.sh: the project's Python, and 2 processes on
CPU over gloo (mmdet_moe/stock_tools.py) giving the single process's results."""
import json
import os
import os.path as osp
import pickle
import shutil
import socket
import stat
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from helpers import (TOOLS, TOY_MOE_CONFIG, as_cli_options, make_tiny_coco, run_tool,
                     toy_overrides)

from mmdet_moe import stock_tools


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_script(script, *args, cwd, env=None, timeout=300):
    """``bash tools/<script> ARGS`` from ``cwd`` with the test's interpreter as
    ``PYTHON``, a port of its own and one thread per process (2 processes, 2 cores)."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1',
               PYTHON=sys.executable, PORT=str(free_port()), **(env or {}))
    proc = subprocess.run(['bash', osp.join(TOOLS, script), *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)
    proc.output = proc.stdout + proc.stderr
    return proc


def options(data):
    """Batch 1 everywhere (a batch of 1 computes the same in 1 or 2 processes); test
    scores from 0, so that the barely trained model keeps detections for the tables."""
    opts = toy_overrides(data, batch_size=1)
    opts.update({'val_dataloader.batch_size': 1, 'test_dataloader.batch_size': 1,
                 'model.test_cfg.score_thr': 0.0, 'custom_hooks.0.score_thr': 0.0})
    return as_cli_options(opts)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """One epoch of the toy MoE RetinaNet in 2 CPU processes (4 images, batch 1: 2
    iterations per process), started from another directory; 3 val images (odd: the
    sampler pads rank 1 with a copy of image 0)."""
    root = tmp_path_factory.mktemp('dist_scripts')
    data = make_tiny_coco(root / 'data', train=4, val=3)
    work_dir = root / 'train'
    proc = run_script('dist_train.sh', TOY_MOE_CONFIG, 2, '--work-dir', work_dir,
                      *options(data), cwd=root)
    assert proc.returncode == 0, proc.output[-5000:]
    return root, data, work_dir, proc.output


@pytest.mark.slow
def test_dist_train_runs_two_cpu_processes(trained):
    _, _, work_dir, output = trained
    assert osp.isfile(work_dir / 'epoch_1.pth')
    assert ('CUDA is not available: distributed run on CPU over gloo (launcher pytorch, '
            'world size 2)') in output
    assert 'GPU number: 2' in output  # mmengine's world size
    assert 'Epoch(train) [1][2/2]' in output  # 4 images over 2 ranks, batch 1
    with open(work_dir / osp.basename(TOY_MOE_CONFIG)) as f:  # the config that ran
        dumped = f.read()
    assert "dist_cfg=dict(backend='gloo')" in dumped
    assert 'device_ids=None' in dumped and 'find_unused_parameters=True' in dumped


@pytest.mark.slow
def test_dist_test_matches_one_process(trained, monkeypatch):
    root, data, work_dir, _ = trained
    ckpt = work_dir / 'epoch_1.pth'
    two, one = root / 'test2', root / 'test1'
    proc = run_script('dist_test.sh', TOY_MOE_CONFIG, ckpt, 2, '--work-dir', two,
                      '--out', two / 'results.pkl', *options(data), cwd=root)
    assert proc.returncode == 0, proc.output[-5000:]
    assert 'world size 2' in proc.output and 'Epoch(test) [2/2]' in proc.output
    monkeypatch.setenv('OMP_NUM_THREADS', '1')  # one thread, as each of the 2 processes
    proc = run_tool('test.py', TOY_MOE_CONFIG, ckpt, '--work-dir', one, '--out',
                    one / 'results.pkl', *options(data), cwd=root)
    assert proc.returncode == 0, proc.output[-5000:]
    assert 'gloo' not in proc.output and 'Epoch(test) [3/3]' in proc.output

    stats = [json.load(open(w / 'expert_size_stats.json')) for w in (two, one)]
    assert stats[0]['num_images'] == stats[1]['num_images'] == 3  # the padded copy dropped
    assert stats[1]['num_detections'] > 0 and stats[1]['layers']
    assert stats[0]['metrics'] and stats[0]['metrics'] == stats[1]['metrics']  # COCO
    assert_same(stats[0], stats[1])

    preds = [pickle.load(open(w / 'results.pkl', 'rb')) for w in (two, one)]
    assert [p['img_id'] for p in preds[0]] == [p['img_id'] for p in preds[1]]
    for a, b in zip(*preds):
        for key in ('bboxes', 'scores', 'labels'):
            assert torch.allclose(a['pred_instances'][key].float(),
                                  b['pred_instances'][key].float(), atol=1e-5)


def assert_same(a, b, path=''):
    """Equal JSON trees: integers, strings and structure exactly, floats allclose."""
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f'{path}/{key}')
    elif isinstance(a, list):
        assert len(a) == len(b), path
        if a and all(isinstance(x, float) for x in a + b):
            assert np.allclose(a, b, rtol=1e-5, atol=1e-6), path
        else:
            for i, (x, y) in enumerate(zip(a, b)):
                assert_same(x, y, f'{path}[{i}]')
    elif isinstance(a, float):
        assert np.isclose(a, b, rtol=1e-5, atol=1e-6), path
    else:
        assert a == b, path


# the shell scripts, with a stub interpreter ------------------------------------------
STUB = '#!/bin/sh\necho "$0 | $* | PYTHONPATH=$PYTHONPATH"\n'


def stub(path):
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(STUB)
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return str(path)


@pytest.fixture
def fake_repo(tmp_path):
    """A copy of the scripts in a repository whose .venv/bin/python echoes its call."""
    repo = tmp_path / 'repo'
    os.makedirs(repo / 'tools')
    for name in ('dist_train.sh', 'dist_test.sh', 'torchrun_tool.sh'):
        shutil.copy(osp.join(TOOLS, name), repo / 'tools' / name)
    venv_python = stub(repo / '.venv' / 'bin' / 'python')
    elsewhere = tmp_path / 'elsewhere'
    os.makedirs(elsewhere)
    return repo, venv_python, elsewhere


def call(script, *args, cwd, **env):
    full = {'PATH': os.environ['PATH'], **env}
    return subprocess.run(['bash', str(script), *map(str, args)], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.slow
def test_scripts_run_the_repo_venv_python_from_any_directory(fake_repo):
    repo, venv_python, elsewhere = fake_repo
    proc = call(repo / 'tools' / 'dist_train.sh', 'cfg.py', 3, '--amp', cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        f'{venv_python} | -m torch.distributed.run --nnodes=1 --node_rank=0 '
        f'--master_addr=127.0.0.1 --nproc_per_node=3 --master_port=29500 '
        f'{repo}/tools/train.py cfg.py --amp --launcher pytorch | PYTHONPATH={repo}\n')
    proc = call(repo / 'tools' / 'dist_test.sh', 'cfg.py', 'ckpt.pth', 2, '--tta',
                cwd=elsewhere, NNODES='2', NODE_RANK='1', MASTER_ADDR='10.0.0.1',
                PORT='1234', PYTHONPATH='/x')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        f'{venv_python} | -m torch.distributed.run --nnodes=2 --node_rank=1 '
        f'--master_addr=10.0.0.1 --nproc_per_node=2 --master_port=1234 '
        f'{repo}/tools/test.py cfg.py ckpt.pth --tta --launcher pytorch '
        f'| PYTHONPATH={repo}:/x\n')


@pytest.mark.slow
def test_scripts_python_override_and_fallback(fake_repo, tmp_path):
    repo, _, elsewhere = fake_repo
    other = stub(tmp_path / 'other' / 'python3.11')
    proc = call(repo / 'tools' / 'dist_train.sh', 'cfg.py', 1, cwd=elsewhere, PYTHON=other)
    assert proc.stdout.startswith(f'{other} | -m torch.distributed.run ')
    # no .venv: `python` on PATH
    shutil.rmtree(repo / '.venv')
    on_path = stub(tmp_path / 'bin' / 'python')
    proc = call(repo / 'tools' / 'dist_train.sh', 'cfg.py', 1, cwd=elsewhere,
                PATH=f'{tmp_path / "bin"}:/usr/bin:/bin')
    assert proc.stdout.startswith(f'{on_path} | -m torch.distributed.run ')


@pytest.mark.slow
def test_scripts_usage(fake_repo):
    repo, _, elsewhere = fake_repo
    for script, args in (('dist_train.sh', ['cfg.py']), ('dist_test.sh', ['cfg.py', 'c']),
                         ('torchrun_tool.sh', ['train.py'])):
        proc = call(repo / 'tools' / script, *args, cwd=elsewhere)
        assert proc.returncode == 2 and 'usage:' in proc.stderr and not proc.stdout


# the CPU fallback's pieces -------------------------------------------------------------
def test_cpu_cfg_options():
    from mmengine.config import Config
    cfg = Config(dict(find_unused_parameters=True))
    assert stock_tools.cpu_cfg_options(cfg) == {
        'env_cfg.dist_cfg.backend': 'gloo',
        'model_wrapper_cfg.type': 'MMDistributedDataParallel',
        'model_wrapper_cfg.device_ids': None,
        'model_wrapper_cfg.broadcast_buffers': False,
        'model_wrapper_cfg.find_unused_parameters': True}
    # a config's own DDP wrapper keeps its settings and gets device_ids=None
    cfg = Config(dict(model_wrapper_cfg=dict(type='MMDistributedDataParallel',
                                             detect_anomalous_params=True)))
    assert stock_tools.cpu_cfg_options(cfg) == {'env_cfg.dist_cfg.backend': 'gloo',
                                                'model_wrapper_cfg.device_ids': None}
    cfg = Config(dict(model_wrapper_cfg=dict(device_ids=[0])))  # explicit: left as is
    assert stock_tools.cpu_cfg_options(cfg) == {'env_cfg.dist_cfg.backend': 'gloo'}
    # a wrapper that is no DistributedDataParallel gets no device_ids from the Runner
    cfg = Config(dict(model_wrapper_cfg=dict(type=torch.nn.Module)))
    assert stock_tools.cpu_cfg_options(cfg) == {'env_cfg.dist_cfg.backend': 'gloo'}


def test_cpu_cfg_options_parse_back():
    """The appended ``--cfg-options`` read back as the values (None, False)."""
    from mmengine.config import Config
    args = stock_tools.parse_stock_args(
        stock_tools.stock_tool_path('train.py'),
        ['train.py', 'cfg.py', '--cfg-options', 'a=1', '--launcher', 'pytorch',
         '--cfg-options'] + [f'{k}={v}' for k, v in
                             stock_tools.cpu_cfg_options(Config()).items()])
    assert args.launcher == 'pytorch' and args.cfg_options == {
        'a': 1, 'env_cfg.dist_cfg.backend': 'gloo',
        'model_wrapper_cfg.type': 'MMDistributedDataParallel',
        'model_wrapper_cfg.device_ids': None,
        'model_wrapper_cfg.broadcast_buffers': False,
        'model_wrapper_cfg.find_unused_parameters': False}


def test_no_fallback_without_pytorch_launcher_or_with_cuda(monkeypatch):
    argv = ['train.py', TOY_MOE_CONFIG]
    assert stock_tools.setup_cpu_distributed(stock_tools.stock_tool_path('train.py'),
                                             argv) is False
    assert argv == ['train.py', TOY_MOE_CONFIG]
    # with CUDA the stock tool runs as it is: nothing parsed, nothing initialised
    ran = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(stock_tools, 'setup_cpu_distributed',
                        lambda *a: pytest.fail('CPU fallback with CUDA'))
    monkeypatch.setattr(stock_tools, 'runpy', types.SimpleNamespace(
        run_path=lambda path, run_name: ran.append((path, run_name))))
    stock_tools.run_stock_tool('train.py')
    assert ran == [(stock_tools.stock_tool_path('train.py'), '__main__')]
