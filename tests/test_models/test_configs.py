"""Every shipped COCO config loads, builds (ResNet-18 override) and trains a step."""
import os.path as osp

import pytest

from helpers import (COCO_MOE_CONFIGS, CONFIGS, TOY_CONFIGS, all_finite, build_model,
                     load_config, one_training_step, with_resnet18)
from mmdet_moe.layers import RelativeImportanceGate
from mmdet_moe.models import moe_parameters



def test_configs_are_named_the_openmmlab_way():
    assert len(COCO_MOE_CONFIGS) >= 12
    for path in COCO_MOE_CONFIGS:
        name = osp.basename(path)
        assert name.split('_')[0] in ('retinanet', 'fcos', 'atss', 'gfl', 'faster-rcnn')
        assert 'coco' in name and '_r50_' in name


@pytest.mark.slow
@pytest.mark.parametrize('path', COCO_MOE_CONFIGS, ids=osp.basename)
def test_config_builds_and_trains_one_step(path):
    cfg = load_config(path)
    model = build_model(with_resnet18(cfg.model))
    losses, _ = one_training_step(model, image_size=96, num_classes=80)
    assert all_finite(losses)
    head = cfg.model.get('bbox_head', {})
    has_balance = 'importance' in str(cfg.model) or 'kl_uniform' in str(cfg.model)
    assert any(k.startswith('loss_moe_') for k in losses) == has_balance
    if 'ft-from-dense' in path:
        moe_ids = {id(p) for p in moe_parameters(model)}
        frozen = [p for p in model.parameters() if id(p) not in moe_ids]
        assert frozen and not any(p.requires_grad for p in frozen)
        assert all(p.grad is None for p in frozen)
        # the paper's SimpleGate and KL loss; its upcycled experts start identical
        assert head.upcycle_noise_std == 0 and 'loss_moe_kl_uniform' in losses
        assert model.bbox_head.cls_moe.gate.gate_type == 'paper_simple'
        assert cfg.param_scheduler[0].milestones == [11, 14] and cfg.max_epochs == 16
    if head.get('expert_type') == 'subnet':  # sparse dispatch: DDP must allow it
        assert cfg.find_unused_parameters is True
    if '-hard_' in path:  # the paper's gate, updated after each of the 5 FPN levels
        gates = [m for m in model.modules() if isinstance(m, RelativeImportanceGate)]
        assert gates and all(g.gate_type == 'paper_fc' and g.num_updates.item() == 5 and
                             g.num_iters.item() == 1 for g in gates)


@pytest.mark.slow
@pytest.mark.parametrize('path', TOY_CONFIGS, ids=osp.basename)
def test_toy_config_builds_and_trains_one_step(path):
    cfg = load_config(path)
    name = osp.basename(path)
    assert name.split('_')[0] in ('retinanet', 'fcos', 'faster-rcnn') and 'toy-coco' in path
    assert '_r18_fpn_' in name or '_r18_moe-fpn_' in name
    model = build_model(cfg.model)
    losses, _ = one_training_step(model, num_classes=5)
    assert all_finite(losses)
    if 'moe' in path:
        hooks = {h['type'] for h in cfg.custom_hooks}
        assert hooks == {'ExpertSizeStatsHook', 'ExpertUtilisationHook'}
    if cfg.model.type == 'MoEDetector':  # MoE anywhere: the paths' convs are MoE layers
        spec = cfg.model.moe_layers[0]
        layer_type = spec.get('type', 'MoEConv2d')
        paths = [spec.paths] if isinstance(spec.paths, str) else list(spec.paths)
        layers = {n for n, m in model.named_modules() if type(m).__name__ == layer_type}
        assert layers == set(paths)
        if layer_type == 'MoEConv2d':
            assert 'loss_moe_importance' in losses
    elif cfg.model.neck.type == 'MoEFPN':  # every lateral, output and extra conv
        layers = {n for n, m in model.named_modules() if type(m).__name__ == 'MoEConv2d'}
        assert layers == {f'neck.{part}.{i}.conv' for part, count in
                          (('lateral_convs', 3), ('fpn_convs', 5)) for i in range(count)}
        assert 'loss_moe_importance' in losses
    elif 'moe' in path:  # MoERetinaNet
        head = model.bbox_head
        gate = (head.cls_moe if head.expert_type == 'subnet' else
                head.cls_convs[head.moe_convs[0]].conv).gate
        hard, equal = 'hard' in path, 'equal' in path
        assert type(gate).__name__ == ('RelativeImportanceGate' if hard else
                                       'EqualWeightGate' if equal else 'TopKGate')
        balance = {k for k in losses if k.startswith('loss_moe_')}
        # the paper's protocol (ft-from-dense): KL to uniform, as its RetinaNet code
        soft_loss = 'loss_moe_kl_uniform' if 'ft-from-dense' in path else 'loss_moe_importance'
        supervised = {'loss_moe_scale_routing'} if 'scale-routed' in path else set()
        assert balance == (set() if hard or equal else {soft_loss}) | supervised
        if hard:  # the paper's FCGate without noise
            assert gate.num_iters.item() == 1 and gate.threshold == 0.3
            assert gate.gate_type == 'paper_fc' and not gate.noisy
    if 'pixel' in path:  # every MoE layer routes per location
        modes = {getattr(getattr(m, 'gate', m), 'gate_mode', None)
                 for m in model.modules() if getattr(m, 'is_moe_module', False)}
        assert modes == {'pixel'}
    if 'ft-from-dense' in path:  # only the classification branch trains
        trainable = {n.split('.')[1] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == ({'cls_moe'} if 'moe' in path else {'cls_convs', 'retina_cls'})


def test_ft_from_dense_lr_per_epoch_is_the_papers_schedule():
    """The paper's classification_moe.py (lines 87-96, 248): Adam 1e-5 and a LambdaLR
    stepped once per epoch, ×1 up to epoch 10, ×0.1 up to 13, then ×0.01."""
    import torch
    from mmengine.registry import PARAM_SCHEDULERS

    cfg = load_config(osp.join(CONFIGS, 'moe_retinanet',
                               'retinanet_r50_moe-cls-head_ft-from-dense_coco.py'))
    assert cfg.optim_wrapper.optimizer == dict(type='Adam', lr=1e-5)
    assert cfg.optim_wrapper.clip_grad == dict(max_norm=0.1, norm_type=2)

    def lr_per_epoch(make_scheduler):
        optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-5)
        scheduler, lrs = make_scheduler(optimizer), []
        for _ in range(cfg.max_epochs):
            lrs.append(optimizer.param_groups[0]['lr'])
            scheduler.step()
        return lrs

    def paper(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: 1 if epoch <= 10 else 0.1 if epoch <= 13 else 0.01)

    def ours(optimizer):
        (scheduler,) = cfg.param_scheduler
        return PARAM_SCHEDULERS.build(dict(scheduler, optimizer=optimizer))

    assert lr_per_epoch(ours) == pytest.approx(lr_per_epoch(paper), rel=1e-6)
