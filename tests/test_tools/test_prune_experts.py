"""tools/prune_experts.py on a toy MoE RetinaNet whose expert 3 is never routed."""
import glob
import json
import os.path as osp

import pytest
import torch
from mmengine.config import Config

from helpers import CONFIGS, TOY_MOE_CONFIG, load_tool, make_tiny_coco, run_tool, toy_overrides

pytestmark = pytest.mark.slow

NEVER = -1e4  # a gate bias that keeps an expert out of every top k


def toy_checkpoint(root, data, config, never_routed, name):
    """(config path, checkpoint path) of ``config`` on the tiny dataset ``data``, with
    the experts ``never_routed[layer]`` of each named MoE layer never routed."""
    from mmdet_moe.engine.evaluation import build_model
    cfg = Config.fromfile(config)
    cfg.merge_from_dict(toy_overrides(data))
    cfg.model.test_cfg.score_thr = 0.0  # an untrained head's scores are ~0.01
    config = str(root / f'{name}.py')
    cfg.dump(config)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    with torch.no_grad():
        for layer, experts in never_routed.items():
            model.get_submodule(layer).gate.w_gate.bias[experts] = NEVER
    checkpoint = str(root / f'{name}.pth')
    torch.save(dict(meta=dict(dataset_meta=dict(classes=('a',))),
                    state_dict=model.state_dict()), checkpoint)
    return config, checkpoint


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """The toy MoE RetinaNet with expert 3 of the classification MoE never routed:
    (config, checkpoint, folder with a tiny dataset in data/)."""
    root = tmp_path_factory.mktemp('prune')
    data = make_tiny_coco(root / 'data', train=1, val=2, size=64)
    return (*toy_checkpoint(root, data, TOY_MOE_CONFIG, {'bbox_head.cls_moe': [3]},
                            'toy_moe'), root)


def tensor_outputs(config, checkpoint, images):
    from mmdet.apis import init_detector  # the stock API loads the written files
    model = init_detector(config, checkpoint, device='cpu')
    with torch.no_grad():
        return model(images, mode='tensor')


def test_never_routed_expert_is_removed_and_predictions_stay(toy, capsys):
    config, checkpoint, root = toy
    out = root / 'pruned'
    tool = load_tool('prune_experts.py')
    assert tool.main([config, checkpoint, '--out-dir', str(out), '--eval',
                      '--work-dir', str(root / 'work')]) == 0
    printed = capsys.readouterr().out
    assert 'bbox_head.cls_moe' in printed and 'removed [3]' in printed
    assert 'never routed on the val set' in printed
    assert 'AP before: mAP' in printed and 'AP after:  mAP' in printed
    [pruned_config] = glob.glob(str(out / '*.py'))
    [pruned_checkpoint] = glob.glob(str(out / '*.pth'))
    summary = json.load(open(out / 'pruning.json'))
    assert summary['layers'][0]['kept'] == [0, 1, 2]
    assert summary['layers'][0]['shares'][3] == 0
    assert summary['metrics_after']['coco/bbox_mAP'] == summary['metrics_before']['coco/bbox_mAP']

    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    original = tensor_outputs(config, checkpoint, images)
    pruned = tensor_outputs(pruned_config, pruned_checkpoint, images)
    from mmdet.apis import init_detector
    model = init_detector(pruned_config, pruned_checkpoint, device='cpu')
    assert model.bbox_head.cls_moe.num_experts == 3
    assert model.bbox_head.cls_moe.gate.w_gate.out_features == 3
    for got_levels, want_levels in zip(pruned, original):
        for got, want in zip(got_levels, want_levels):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the stock test tool runs the written files
    proc = run_tool('test.py', pruned_config, pruned_checkpoint, '--work-dir',
                    root / 'work-test')
    assert proc.returncode == 0, proc.output[-3000:]
    assert 'coco/bbox_mAP' in proc.output


def test_layers_pruned_separately_predict_through_the_stock_test_tool(toy, capsys):
    """The toy FCOS with two MoE convs in its head, each pruned to the experts it routed
    on the val images (the regression conv to 2: experts 0 and 3 are never routed; the
    classification conv drops at least its never-routed expert 3); the written files
    predict (tags as wide as the widest layer) and the statistics hook in the config
    reports each layer with its own experts."""
    _, _, root = toy
    config, checkpoint = toy_checkpoint(
        root, str(root / 'data'), osp.join(CONFIGS, 'toy', 'fcos_r18_fpn_moe-head_4e_toy-coco.py'),
        {'bbox_head.cls_convs.1.conv': [3], 'bbox_head.reg_convs.1.conv': [0, 3]}, 'fcos')
    out = root / 'fcos-pruned'
    assert load_tool('prune_experts.py').main([
        config, checkpoint, '--out-dir', str(out), '--work-dir', str(root / 'work-fcos')]) == 0
    assert 'predicts there what the original does' in capsys.readouterr().out
    rows = {name: row for row in json.load(open(out / 'pruning.json'))['layers']
            for name in row['layers']}
    assert rows['bbox_head.reg_convs.1.conv']['removed'] == [0, 3]
    assert 3 in rows['bbox_head.cls_convs.1.conv']['removed']
    work = root / 'work-fcos-test'
    proc = run_tool('test.py', *sorted(glob.glob(str(out / 'fcos_pruned.*')))[::-1],
                    '--work-dir', work)
    assert proc.returncode == 0, proc.output[-3000:]
    layers = json.load(open(work / 'expert_size_stats.json'))['layers']
    assert {name: layer['num_experts'] for name, layer in layers.items()} == {
        name: len(row['kept']) for name, row in rows.items()}


def test_pruning_below_top_k_is_refused_and_writes_nothing(toy, capsys):
    config, checkpoint, root = toy
    out, work = root / 'refused', root / 'work-refused'
    tool = load_tool('prune_experts.py')
    assert tool.main([config, checkpoint, '--out-dir', str(out), '--work-dir', str(work),
                      '--min-share', '0.9']) == 2
    err = capsys.readouterr().err
    assert 'prune_experts: error: bbox_head.cls_moe' in err and 'top_k=2' in err
    assert not osp.exists(out)
    # the shares of that run, read back from its statistics file
    stats = str(work / 'original' / 'expert_size_stats' / 'test.json')
    assert tool.main([config, checkpoint, '--out-dir', str(out), '--stats', stats]) == 0
    assert json.load(open(out / 'pruning.json'))['layers'][0]['removed'] == [3]
    assert 'AP after' not in capsys.readouterr().out  # nothing routed was removed


def test_removing_routed_experts_prints_the_ap_before_and_after(toy, capsys):
    config, checkpoint, root = toy
    out, work = root / 'routed', root / 'work-routed'
    tool = load_tool('prune_experts.py')
    assert tool.main([config, checkpoint, '--out-dir', str(out), '--work-dir', str(work),
                      '--min-share', '0.0']) == 0
    shares = json.load(open(out / 'pruning.json'))['layers'][0]['shares']
    routed = sorted(s for s in shares if s > 0)[0]  # the least used routed expert
    assert tool.main([config, checkpoint, '--out-dir', str(out), '--work-dir', str(work),
                      '--stats', str(work / 'original' / 'expert_size_stats' / 'test.json'),
                      '--min-share', str(routed * 1.01)]) == 0
    printed = capsys.readouterr().out
    summary = json.load(open(out / 'pruning.json'))
    assert len(summary['layers'][0]['removed']) == 2 and not summary['unchanged']
    assert 'AP before: mAP' in printed and 'AP after:  mAP' in printed
    assert 'never routed' not in printed


def test_an_out_dir_holding_the_checkpoint_is_refused(toy, capsys):
    config, checkpoint, _ = toy
    tool = load_tool('prune_experts.py')
    assert tool.main([config, checkpoint, '--out-dir', osp.dirname(checkpoint)]) == 2
    assert 'holds the input' in capsys.readouterr().err
    assert osp.isfile(checkpoint) and osp.isfile(config)


def test_a_checkpoint_of_another_model_is_refused(toy, tmp_path, capsys):
    config, checkpoint, _ = toy
    state = torch.load(checkpoint)
    state['state_dict'].pop('bbox_head.cls_moe.gate.w_gate.bias')
    bad = tmp_path / 'bad.pth'
    torch.save(state, bad)
    tool = load_tool('prune_experts.py')
    assert tool.main([config, str(bad), '--out-dir', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert 'does not match the config' in err and 'bbox_head.cls_moe.gate.w_gate.bias' in err
    assert not osp.exists(tmp_path / 'out')
