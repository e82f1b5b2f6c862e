"""`make demo-paper`: the paper's protocol (dense model, then the MoE head fine-tuned)."""
import re
import statistics

import pytest
import torch

from helpers import (TOY_BASE_CONFIG, build_model, import_tool, load_config,
                     make_tiny_coco, one_training_step, run_tool)
from mmdet_moe.engine.evaluation import key_mismatch


@pytest.fixture(scope='module')
def paper():
    return import_tool('demo_paper')


def test_arms_cover_each_constraint_and_init_once(paper):
    names = [arm.name for arm in paper.ARMS]
    assert names == ['control', 'soft-fresh', 'soft-copied', 'soft-noisy', 'hard-fresh',
                     'hard-copied', 'hard-noisy', 'equal-fresh', 'equal-noisy']
    assert len({arm.label for arm in paper.ARMS}) == len(names)


@pytest.mark.parametrize('args, message', [
    (['--seeds', '0'], '--seeds must be >= 1, got 0'),
    (['--iters', '-2'], '--iters must be >= 1, got -2'),
    (['--dense-checkpoint', 'no/such.pth'], '--dense-checkpoint: no such file: no/such.pth'),
])
def test_bad_arguments_are_named(paper, capsys, args, message):
    with pytest.raises(SystemExit):
        paper.parse_args(args)
    assert message in capsys.readouterr().err


def test_no_train_dense_without_a_checkpoint_writes_nothing(paper, tmp_path, capsys):
    work = tmp_path / 'work'
    code = paper.main(['--no-train-dense', '--work-dir', str(work), '--compare-work-dir',
                       str(tmp_path / 'demo'), '--data-root', str(tmp_path / 'data')])
    err = capsys.readouterr().err
    assert code == 2
    assert str(tmp_path / 'demo' / 'dense_seed0' / 'last_checkpoint') in err
    assert str(work / 'dense_seed0' / 'last_checkpoint') in err
    assert 'make demo-compare' in err and '--dense-checkpoint PATH' in err
    assert not work.exists() and not (tmp_path / 'data').exists()


def test_demo_paper_flag_dispatches_with_its_options(paper, tmp_path, capsys):
    demo = import_tool('demo')
    with pytest.raises(SystemExit) as exit_info:
        demo.main(['--paper', '--no-train-dense', '--work-dir', str(tmp_path / 'work'),
                   '--compare-work-dir', str(tmp_path / 'demo')])
    assert exit_info.value.code == 2
    assert 'no dense checkpoint to fine-tune from' in capsys.readouterr().err


def test_a_checkpoint_of_another_model_is_refused_before_training(paper, tmp_path, capsys):
    state = build_model(load_config(TOY_BASE_CONFIG).model).state_dict()
    state['bbox_head.retina_cls.weight'] = torch.zeros(3, 64, 3, 3)  # another class count
    del state['neck.fpn_convs.0.conv.bias']
    state['bbox_head.cls_moe.gate.w_gate.weight'] = torch.zeros(4, 64)
    checkpoint = tmp_path / 'other.pth'
    torch.save(dict(state_dict=state, meta={}), checkpoint)
    work = tmp_path / 'work'
    code = paper.main(['--dense-checkpoint', str(checkpoint), '--work-dir', str(work),
                       '--data-root', str(tmp_path / 'data')])
    err = capsys.readouterr().err
    assert code == 2 and f'the dense checkpoint {checkpoint} is not of' in err
    assert "1 missing (e.g. ['neck.fpn_convs.0.conv.bias'])" in err
    assert "1 unexpected (e.g. ['bbox_head.cls_moe.gate.w_gate.weight'])" in err
    assert '1 of another shape' in err and \
        'bbox_head.retina_cls.weight (3, 64, 3, 3) ≠ (45, 64, 3, 3)' in err
    assert not work.exists() and not (tmp_path / 'data').exists()


def test_key_mismatch_counts_and_names_keys():
    expected = {f'k{i}': torch.zeros(2) for i in range(6)}
    found = dict(expected, x=torch.zeros(1), y=torch.zeros(1), k0=torch.zeros(3))
    for key in ('k4', 'k5'):
        del found[key]
    assert key_mismatch(expected, found, examples=1) == (
        "2 missing (e.g. ['k4']); 2 unexpected (e.g. ['x']); 1 of another shape "
        "(checkpoint ≠ model) (e.g. ['k0 (3,) ≠ (2,)'])")
    assert key_mismatch(expected, dict(expected)) is None


def test_fresh_experts_start_from_a_checkpoint_without_the_branch(paper, tmp_path):
    state = build_model(load_config(TOY_BASE_CONFIG).model).state_dict()
    dense = tmp_path / 'dense.pth'
    torch.save(dict(state_dict=state, meta=dict(epoch=3)), dense)
    out = paper.write_without_branch(str(dense), str(tmp_path / 'trunk.pth'))
    kept = torch.load(out, weights_only=False)
    assert kept['meta'] == dict(epoch=3)
    assert set(kept['state_dict']) == {
        k for k in state if not k.startswith(('bbox_head.cls_convs.', 'bbox_head.retina_cls.'))}
    assert 'bbox_head.reg_convs.0.conv.weight' in kept['state_dict']


def figures(ap, living=None, cv=None, nmi=None, nmi_level=None, seconds=10.0):
    """Per-seed figure dicts as PaperRun.figures gives them."""
    rows = []
    for i, value in enumerate(ap):
        row = dict(AP=value, AP_S=-1, AP_M=value / 2, AP_L=None, seconds=seconds + i)
        for key, given in (('living_experts', living), ('importance_cv', cv), ('nmi', nmi),
                           ('nmi_given_level', nmi_level)):
            row[key] = None if given is None else given[i]
        for key in ('nmi', 'nmi_given_level'):
            row[f'{key}_lower'] = None if row[key] is None else row[key] - 0.01
            row[f'{key}_upper'] = None if row[key] is None else row[key] + 0.01
        rows.append(row)
    return rows


def cells(row):
    """The cells of a markdown table row (markdown_table escapes a '|' in a cell)."""
    return [c.strip().replace('\\|', '|') for c in re.split(r'(?<!\\)\|', row)[1:-1]]


def test_the_table_from_given_numbers(paper):
    arms = dict(control=figures([0.30, 0.32]),
                **{'hard-copied': figures([0.40, 0.42], living=[2, 3], cv=[1.0, 0.8],
                                          nmi=[0.2, 0.4], nmi_level=[0.01, 0.03])})
    table = paper.protocol_table(arms, {'control': 'dense', 'hard-copied': 'hard'})
    lines = table.splitlines()
    assert cells(lines[0]) == ['arm', *paper.HEADERS]
    control, hard = (cells(line) for line in lines[2:])
    sd = statistics.stdev
    assert control == ['dense', f'0.310 ± {sd([0.30, 0.32]):.3f}', '–',
                       f'0.155 ± {sd([0.15, 0.16]):.3f}', '–', '–', '–', '–', '–', '10 ± 1']
    assert hard[1] == f'0.410 ± {sd([0.40, 0.42]):.3f}'
    assert hard[5:9] == [f'2.500 ± {sd([2, 3]):.3f}', f'0.900 ± {sd([1.0, 0.8]):.3f}',
                         f'0.300 ± {sd([0.2, 0.4]):.3f} [0.290, 0.310]',
                         f'0.020 ± {sd([0.01, 0.03]):.3f} [0.010, 0.030]']


def test_the_claims_from_given_numbers(paper):
    arms = {
        'control': figures([0.30, 0.31]),
        # hard beats the control clearly, the soft arm only within the seed spread
        'hard-copied': figures([0.40, 0.41], living=[2, 2], cv=[1.2, 1.3], nmi=[0.1, 0.4],
                               nmi_level=[0.01, 0.02]),
        'soft-copied': figures([0.35, 0.45], living=[4, 4], cv=[0.2, 0.3], nmi=[0.3, 0.1],
                               nmi_level=[0.00, 0.01]),
    }
    a, b, c = paper.claim_sentences(arms)
    assert a.startswith('(a) hard constraints "increase overall model performance": '
                        'supported on the toy')
    assert 'AP: hard-copied 0.405 vs control 0.305 (higher)' in a
    assert 'AP: hard-copied 0.405 vs soft-copied 0.400 (within the seed spread)' in a
    assert b.startswith('(b) soft constraints "handle expert utilization better": '
                        'supported')
    assert 'living_experts: soft-copied 4.000 vs hard-copied 2.000 (higher)' in b
    assert 'importance_cv: soft-copied 0.250 vs hard-copied 1.250 (lower)' in b
    assert c.startswith('(c) soft constraints "support the expert specialization process":'
                        ' not shown (every difference within the seed spread)')
    # the other way round: contradicted; one seed: cannot tell
    arms['hard-copied'] = figures([0.20, 0.21])
    assert 'contradicted' in paper.claim_sentences(arms)[0]
    one_seed = {name: rows[:1] for name, rows in arms.items()}
    assert 'cannot tell (one seed' in paper.claim_sentences(one_seed)[0]


def test_the_control_is_frozen_as_the_moe_arms(paper):
    """Only the classification branch trains (its dense form in the control, its
    experts and gate in the MoE arms), and the backbone's BatchNorm statistics stay
    as loaded through a training step."""
    for arm in (paper.ARMS[0], paper.ARMS[1]):
        model = build_model(load_config(arm.config).model)
        trainable = {n.split('.')[1] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == ({'cls_convs', 'retina_cls'} if arm.init is None else
                             {'cls_moe'}), arm.name
        before = model.backbone.bn1.running_mean.clone()
        losses, _ = one_training_step(model, num_classes=5)
        assert torch.equal(model.backbone.bn1.running_mean, before), arm.name
        assert all(p.grad is None for n, p in model.named_parameters()
                   if n.startswith(('backbone', 'neck', 'bbox_head.reg')))


@pytest.mark.slow
def test_the_paper_protocol_end_to_end(tmp_path):
    data = make_tiny_coco(tmp_path / 'data', train=8, val=4, size=96)
    work = tmp_path / 'work'
    proc = run_tool('demo.py', '--paper', '--data-root', data, '--work-dir', work,
                    '--compare-work-dir', tmp_path / 'demo', '--train-images', 8,
                    '--val-images', 4, '--image-size', 96, '--dense-epochs', 1,
                    '--iters', 2, '--seeds', 1, '--tiny', timeout=1800)
    assert proc.returncode == 0, proc.output[-3000:]
    report = (work / 'paper_protocol.md').read_text()
    rows = [line for line in report.splitlines() if line.startswith('| ')][1:]
    assert len(rows) == 9  # the arms, below the header (the separator is '|---|')
    for row in rows:
        figures = cells(row)  # every arm has a wall time, a MoE arm its expert figures
        assert len(figures) == 10 and figures[-1] != '–', row
        assert (figures[5] == '–') == (row is rows[0]), row  # the control: no experts
    assert sum('(a) hard constraints' in line or '(b) soft' in line or '(c) soft' in line
               for line in report.splitlines()) == 3
    assert report.strip() in proc.output
    # the dense model was trained in the work dir (a later run finds it there)
    assert (work / 'dense_seed0' / 'last_checkpoint').is_file()
    assert (work / 'hard-fresh_seed0' / 'report' / 'report.md').is_file()
    assert 'cannot tell (one seed' in report
