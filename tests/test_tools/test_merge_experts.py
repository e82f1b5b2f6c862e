"""tools/merge_experts.py: MoEConv2d experts folded into a stock mmdet detector."""
import glob
import json
import os.path as osp
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config

from helpers import TOY_MOE_CONFIG, load_tool, make_tiny_coco, toy_overrides

pytestmark = pytest.mark.slow

# runs the merged files with mmdet_moe unimportable, and compares with the outputs saved
NO_MMDET_MOE = '''
import sys
sys.modules['mmdet_moe'] = None  # import mmdet_moe now raises ImportError
import torch
from mmdet.apis import init_detector
config, checkpoint, expected = sys.argv[1:]
model = init_detector(config, checkpoint, device='cpu')
saved = torch.load(expected)
with torch.no_grad():
    outputs = model(saved['images'], mode='tensor')
diff = max((g - w).abs().max().item() for got, want in zip(outputs, saved['outputs'])
           for g, w in zip(got, want))
print(f'max abs diff {diff:.3g}')
sys.exit(0 if diff <= 1e-4 else 1)
'''


def conv_experts_config(root, data, **gate):
    """The toy MoE RetinaNet with the last conv (of 2) of both towers as 4 MoEConv2d experts."""
    cfg = Config.fromfile(TOY_MOE_CONFIG)
    cfg.merge_from_dict(toy_overrides(data))
    cfg.model.test_cfg.score_thr = 0.0  # an untrained head's scores are ~0.01
    cfg.model.bbox_head.update(expert_type='conv', moe_branches='both', moe_convs=[0],
                               balance_cfg=None, top_k=gate['top_k'])
    if 'gate_cfg' in gate:  # replaced whole (update() would merge it into the old one)
        cfg.model.bbox_head.gate_cfg = gate['gate_cfg']
    name = 'equal' if gate['top_k'] == 4 else 'topk'
    path = str(root / f'toy_conv_{name}.py')
    cfg.dump(path)
    return cfg, path


def save_checkpoint(cfg, path, seed=0):
    from mmdet_moe.engine.evaluation import build_model
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.init_weights()
    torch.save(dict(meta=dict(dataset_meta=dict(classes=('a',))),
                    state_dict=model.state_dict()), path)
    return model


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('merge')
    return root, make_tiny_coco(root / 'data', train=1, val=2, size=64)


def test_equal_weight_experts_merge_into_a_stock_detector_that_runs_without_mmdet_moe(
        data, capsys):
    root, data_root = data
    cfg, config = conv_experts_config(root, data_root, top_k=4,
                                      gate_cfg=dict(type='EqualWeightGate'))
    model = save_checkpoint(cfg, root / 'equal.pth').eval()
    out = root / 'merged-equal'
    assert load_tool('merge_experts.py').main([
        config, str(root / 'equal.pth'), '--out-dir', str(out),
        '--work-dir', str(root / 'work-equal')]) == 0
    printed = capsys.readouterr().out
    assert 'AP of the MoE model:    mAP' in printed and 'AP of the merged model: mAP' in printed
    summary = json.load(open(out / 'merging.json'))
    assert summary['mean_gates']['bbox_head.cls_convs.0.conv'] == [0.25] * 4
    # the merge is exact here: the same detections, hence the same AP
    assert summary['metrics_after'] == pytest.approx(summary['metrics_before'], abs=1e-3)
    [merged_config] = glob.glob(str(out / '*.py'))
    [merged_checkpoint] = glob.glob(str(out / '*.pth'))
    text = open(merged_config).read()
    assert 'mmdet_moe' not in text and 'MoE' not in text

    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.save(dict(images=images, outputs=model(images, mode='tensor')),
                   root / 'expected.pt')
    proc = subprocess.run([sys.executable, '-c', NO_MMDET_MOE, merged_config,
                           merged_checkpoint, str(root / 'expected.pt')],
                          capture_output=True, text=True, cwd=str(root))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_routed_experts_merge_with_their_mean_gate_weights(data, capsys):
    root, data_root = data
    cfg, config = conv_experts_config(root, data_root, top_k=2)
    model = save_checkpoint(cfg, root / 'topk.pth')
    out = root / 'merged-topk'
    assert load_tool('merge_experts.py').main([
        config, str(root / 'topk.pth'), '--out-dir', str(out),
        '--work-dir', str(root / 'work-topk')]) == 0
    gates = json.load(open(out / 'merging.json'))['mean_gates']
    stats = json.load(open(root / 'work-topk' / 'moe' / 'expert_size_stats' / 'test.json'))
    merged = torch.load(glob.glob(str(out / '*.pth'))[0])['state_dict']
    for name in ('bbox_head.cls_convs.0.conv', 'bbox_head.reg_convs.0.conv'):
        layer = stats['layers'][name]
        mean = torch.tensor(layer['importance'], dtype=torch.float64) / layer['rows']
        torch.testing.assert_close(torch.tensor(gates[name], dtype=torch.float64), mean)
        assert sum(gates[name]) == pytest.approx(1.0)
        moe = model.get_submodule(name)
        want = sum(g * w for g, w in zip(mean.float(), moe.weight.detach()))
        torch.testing.assert_close(merged[name + '.weight'], want)
        if moe.bias is None:  # the toy head's towers are normalised: convs without bias
            assert name + '.bias' not in merged
        else:
            torch.testing.assert_close(merged[name + '.bias'],
                                       mean.float() @ moe.bias.detach())


def test_subnet_experts_are_refused_and_nothing_is_written(data, tmp_path, capsys):
    root, data_root = data
    cfg = Config.fromfile(TOY_MOE_CONFIG)
    cfg.merge_from_dict(toy_overrides(data_root))
    config = str(tmp_path / 'subnet.py')
    cfg.dump(config)
    save_checkpoint(cfg, tmp_path / 'subnet.pth')
    assert load_tool('merge_experts.py').main([
        config, str(tmp_path / 'subnet.pth'), '--out-dir', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert 'merge_experts: error: bbox_head.cls_moe: a TowerMoE cannot be merged' in err
    assert 'non-linear' in err
    assert not osp.exists(tmp_path / 'out')
