"""tools/train.py and tools/test.py behave as mmdet's stock tools, incl. checkpoints."""
import glob
import os.path as osp

import pytest
from helpers import TOY_BASE_CONFIG, as_cli_options, make_tiny_coco, run_tool, toy_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """One epoch (2 iterations) of the toy RetinaNet through tools/train.py."""
    root = tmp_path_factory.mktemp('stock_tools')
    data = make_tiny_coco(root / 'data')
    work_dir = root / 'work'
    proc = run_tool('train.py', TOY_BASE_CONFIG, '--work-dir', work_dir,
                    *as_cli_options(toy_overrides(data)))
    assert proc.returncode == 0, proc.output[-3000:]
    return data, work_dir


def test_train_writes_a_checkpoint(trained):
    _, work_dir = trained
    assert osp.isfile(work_dir / 'epoch_1.pth')
    assert osp.isfile(work_dir / 'retinanet_r18_fpn_4e_toy-coco.py')


def test_test_tool_loads_the_checkpoint(trained, tmp_path):
    data, work_dir = trained
    out = tmp_path / 'results.pkl'
    proc = run_tool('test.py', TOY_BASE_CONFIG, work_dir / 'epoch_1.pth', '--work-dir',
                    tmp_path, '--out', out, *as_cli_options(toy_overrides(data)))
    assert proc.returncode == 0, proc.output[-3000:]
    assert 'Load checkpoint from' in proc.output and 'Epoch(test)' in proc.output
    assert osp.isfile(out)


def test_train_resumes_from_the_checkpoint(trained):
    data, work_dir = trained
    proc = run_tool('train.py', TOY_BASE_CONFIG, '--work-dir', work_dir, '--resume',
                    *as_cli_options(toy_overrides(data, max_epochs=2)))
    assert proc.returncode == 0, proc.output[-3000:]
    assert 'resumed epoch: 1' in proc.output
    assert osp.isfile(work_dir / 'epoch_2.pth')
    assert len(glob.glob(str(work_dir / '*' / 'vis_data'))) >= 2  # two runs logged


def test_train_help_lists_the_stock_flags():
    proc = run_tool('train.py', '--help')
    for flag in ('--work-dir', '--resume', '--amp', '--cfg-options', '--launcher'):
        assert flag in proc.stdout
    proc = run_tool('test.py', '--help')
    for flag in ('--out', '--show-dir', '--cfg-options', '--launcher'):
        assert flag in proc.stdout
