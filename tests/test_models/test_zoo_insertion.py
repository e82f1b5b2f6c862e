"""MoE in the detectors of mmdet's zoo that the RetinaNet path does not cover: convs
shared across levels, one conv per level, necks without ``conv_cfg``, partial coverage.
(The whole zoo is in ``tools/moe_census.py``; ``tests/test_tools/test_moe_census.py``
runs a subset of it.)"""
import pytest
import torch
from mmengine.config import ConfigDict

from helpers import all_finite, build_model, one_training_step, predict, stock_model_cfg
from mmdet_moe.layers import MoEConv2d

MOE = dict(num_experts=4, top_k=2, balance_cfg=dict(importance=0.5))
NAS_FPN = 'nas_fpn/retinanet_r50_nasfpn_crop640-50e_coco.py'


def moe_detector(path, detector_cfg, **spec):
    return ConfigDict(type='MoEDetector', detector=detector_cfg,
                      moe_layers=[dict(paths=path, **MOE, **spec)])


def nas_fpn_retinanet():
    cfg = stock_model_cfg(NAS_FPN)
    cfg.test_cfg.score_thr = 0.0
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize('path', ['bbox_head.cls_convs.0.0.conv',
                                  'bbox_head.cls_convs.*.0.conv'])
def test_a_conv_shared_across_levels_becomes_one_moe_layer_at_every_use(path):
    """RetinaSepBNHead shares each tower conv across its levels (BN per level): naming
    the conv once (or at every level) replaces it everywhere, one MoE layer routed per
    level, and its detections are tagged (it crashed at predict: called once for 5
    levels)."""
    model = build_model(moe_detector(path, nas_fpn_retinanet()))
    head = model.bbox_head
    layers = {id(head.cls_convs[level][0].conv) for level in range(len(head.cls_convs))}
    assert len(layers) == 1 and isinstance(head.cls_convs[4][0].conv, MoEConv2d)
    assert not isinstance(head.cls_convs[0][1].conv, MoEConv2d)  # the others as they were
    losses, _ = one_training_step(model, num_classes=80)
    assert 'loss_moe_importance' in losses and all_finite(losses)
    results = predict(model, num_classes=80)
    for result in results:
        pred = result.pred_instances
        assert len(pred) and pred.metainfo['expert_layers'] == ['bbox_head.cls_convs.0.0.conv']
        assert set(pred.levels.tolist()) <= set(range(5))


def test_a_subnet_path_into_a_tower_of_shared_convs_names_the_alternative():
    cfg = moe_detector('bbox_head.cls_convs', nas_fpn_retinanet(), expert='subnet')
    with pytest.raises(ValueError, match=r"bbox_head\.cls_convs\.0\.0\.conv.*also at.*"
                       r"bbox_head\.cls_convs\.1\.0\.conv.*expert='conv'"):
        build_model(cfg)


@pytest.mark.slow
def test_a_conv_of_one_level_tags_that_level_and_zeros_elsewhere():
    """SSD has one conv per level: a MoE conv on level 1's classifier runs once for 6
    levels (it crashed at predict); its detections at level 1 carry their image's gate
    row, those of other levels a row of zeros."""
    from mmengine.config import Config
    import mmdet
    import os.path as osp
    from mmdet_moe.layers import record_gates
    cfg = Config.fromfile(osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', 'ssd',
                                   'ssd300_coco.py')).model
    cfg.backbone.init_cfg = None
    cfg.test_cfg.score_thr = 0.0
    torch.manual_seed(0)
    model = build_model(moe_detector('bbox_head.cls_convs.1.0', cfg))
    model.bbox_head.loss_cls = None  # mmdet 3.3's SSD predict needs it (mmdet issue 11063)
    losses, _ = one_training_step(model, image_size=300, num_classes=80)
    assert 'loss_moe_importance' in losses and all_finite(losses)
    with record_gates() as recorder:
        results = predict(model, image_size=300, num_classes=80)
    rows = [r.weights for r in recorder.records if r.name == 'bbox_head.cls_convs.1.0']
    assert len(rows) == 1
    levels_seen = set()
    for b, result in enumerate(results):
        pred = result.pred_instances
        levels_seen |= set(pred.levels.tolist())
        weights = pred.expert_weights[:, 0]
        at_one = pred.levels == 1
        torch.testing.assert_close(weights[at_one], rows[0][b].expand_as(weights[at_one]))
        assert torch.equal(weights[~at_one], torch.zeros_like(weights[~at_one]))
    assert 1 in levels_seen and len(levels_seen) > 1
