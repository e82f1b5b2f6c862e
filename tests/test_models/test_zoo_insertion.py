"""MoE in the detectors of mmdet's zoo that the RetinaNet path does not cover: convs
shared across levels, one conv per level, necks without ``conv_cfg``, partial coverage.
(The whole zoo is in ``tools/moe_census.py``; ``tests/test_tools/test_moe_census.py``
runs a subset of it.)"""
import pytest
import torch
from mmengine.config import ConfigDict

from helpers import all_finite, build_model, one_training_step, predict, stock_model_cfg
from mmdet_moe.layers import MoEConv2d, record_gates

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
                                  'bbox_head.cls_convs.1.0.conv',
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
    # its first path names the shared layer, which routes once per level
    assert_tags_are_level_rows(model, 'bbox_head.cls_convs.0.0.conv', levels=5)


def assert_tags_are_level_rows(model, name, levels, **inputs):
    """Each detection carries the gate row of its (image, level) of layer ``name``."""
    with record_gates() as recorder:
        results = predict(model, num_classes=80, **inputs)
    rows = [r.weights for r in recorder.records if r.name == name]
    assert len(rows) == levels
    for b, result in enumerate(results):
        pred = result.pred_instances
        assert len(pred) and pred.metainfo['expert_layers'] == [name]
        want = torch.stack([rows[level][b] for level in pred.levels.tolist()])
        torch.testing.assert_close(pred.expert_weights[:, 0], want)


@pytest.mark.slow
def test_condinst_detections_are_tagged_with_their_level_rows():
    """CondInst decodes with its own predict_by_feat, per image and level as mmdet's
    base does (it keeps mask parameters too): its detections were untagged."""
    cfg = stock_model_cfg('condinst/condinst_r50_fpn_ms-poly-90k_coco_instance.py')
    cfg.test_cfg.score_thr = 0.0
    model = build_model(moe_detector('bbox_head.cls_convs.0.conv', cfg))
    assert_tags_are_level_rows(model, 'bbox_head.cls_convs.0.conv', levels=5)


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


def test_a_neck_without_conv_cfg_names_the_moe_detector_paths():
    """CTResNetNeck builds ConvModules but takes no conv_cfg: mmdet's bare TypeError
    becomes one naming MoEDetector paths to its convs."""
    from mmdet.registry import MODELS
    cfg = dict(type='CTResNetNeck', in_channels=64, num_deconv_filters=(32, 16),
               num_deconv_kernels=(4, 4), use_dcn=False,
               conv_cfg=dict(type='MoEConv2d', **MOE))
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'conv_cfg'.*"
                       r"CTResNetNeck takes no conv_cfg.*drop its conv_cfg.*MoEDetector.*paths="
                       r"'<component>\.deconv_layers\.0\.conv'"):
        MODELS.build(cfg)


def test_other_type_errors_pass_through_untouched():
    from mmdet.registry import MODELS
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'") as info:
        MODELS.build(dict(type='FPN', in_channels=[8, 16], out_channels=8, num_outs=2,
                          bogus=1))
    assert 'MoEDetector' not in str(info.value)


def nas_fcos_fpn(**conv_cfg):
    return dict(type='NASFCOS_FPN', in_channels=[16, 32, 64, 128], out_channels=16,
                start_level=1, add_extra_convs=True, num_outs=5,
                norm_cfg=dict(type='BN'), conv_cfg=dict(type='MoEConv2d', **MOE, **conv_cfg))


def retinanet_with_neck(neck):
    cfg = stock_model_cfg('retinanet/retinanet_r50_fpn_1x_coco.py')
    cfg.backbone.update(depth=18, out_indices=(0, 1, 2, 3))
    cfg.neck = neck
    cfg.bbox_head.update(in_channels=16, feat_channels=16)
    return cfg


def test_partial_conv_cfg_coverage_is_said_in_one_line(capsys):
    """NAS-FCOS's FPN builds some convs without conv_cfg: one line names how many
    stayed dense and the path that would make them MoE."""
    from mmengine.logging import MMLogger
    neck = nas_fcos_fpn()
    neck.update(in_channels=[64, 128, 256, 512])
    logger = MMLogger.get_current_instance()
    messages = []
    handler = type('H', (__import__('logging').Handler,), {
        'emit': lambda self, record: messages.append(record.getMessage())})()
    logger.addHandler(handler)
    try:
        build_model(retinanet_with_neck(neck))
    finally:
        logger.removeHandler(handler)
    lines = [m for m in messages if m.startswith('neck (NASFCOS_FPN)')]
    assert len(lines) == 1, messages
    assert 'stay dense' in lines[0] and "paths='neck." in lines[0]


def test_partial_conv_cfg_coverage_can_be_refused():
    neck = nas_fcos_fpn(dense_convs='error')
    neck.update(in_channels=[64, 128, 256, 512])
    with pytest.raises(ValueError, match=r"neck \(NASFCOS_FPN\).*stay dense.*"
                       r"dense_convs='error'"):
        build_model(retinanet_with_neck(neck))


def test_dense_convs_policy_must_be_known():
    from mmengine.registry import MODELS
    with pytest.raises(ValueError, match=r"dense_convs='warn' is unknown.*'log', 'error'"):
        MODELS.build(dict(type='MoEConv2d', in_channels=4, out_channels=4, kernel_size=3,
                          dense_convs='warn'))


@pytest.mark.slow
def test_an_roi_extractor_pooling_every_level_keeps_the_proposal_level():
    """GRoIE's GenericRoIExtractor pools each RoI from every level (no map_roi_levels):
    tagging crashed after training; detections now carry their proposal's tags and
    level."""
    cfg = stock_model_cfg('groie/faste-rcnn_r50_fpn_groie_1x_coco.py')
    cfg.test_cfg.rcnn.score_thr = 0.0
    model = build_model(moe_detector('rpn_head.rpn_conv', cfg))
    losses, _ = one_training_step(model, num_classes=80)
    assert all_finite(losses)
    for result in predict(model, num_classes=80):
        pred = result.pred_instances
        assert len(pred) and pred.metainfo['expert_layers'] == ['rpn_head.rpn_conv']
        assert pred.expert_weights.shape[:2] == (len(pred), 1)
        assert set(pred.levels.tolist()) <= set(range(5))


def test_a_module_whose_calls_match_no_level_is_left_untagged_not_fatal():
    """A prediction after training must not fail on tagging: a head module called once
    on a map whose size two levels share cannot be placed; it stays untagged (its
    statistics keep per-image rows) and the log says why."""
    import torch.nn as nn
    from mmdet_moe.layers import GateRecorder
    from mmdet_moe.models.dense_heads.expert_tagging import GateMaps
    head = nn.Module()
    head.conv = MoEConv2d(4, 4, 3, padding=1)
    head.conv.moe_name = 'bbox_head.unmatched_conv'
    recorder = GateRecorder()
    recorder.add(head.conv.moe_name, torch.full((2, 4), 0.25), module=head.conv)
    sizes = [torch.Size([4, 4]), torch.Size([4, 4]), torch.Size([2, 2])]
    gates = GateMaps(head, recorder, sizes, call_sizes={head.conv: [torch.Size([4, 4])]})
    assert not gates  # nothing to tag with: the stock decode runs untagged
    placed = GateMaps(head, recorder, sizes, call_sizes={head.conv: [torch.Size([2, 2])]})
    assert placed.modules[0][2] is recorder.records[0] and placed.modules[0][0] is None


def test_a_subnet_in_a_head_whose_init_weights_reads_its_tower_is_refused_at_build():
    """DDOD's init_weights initialises every tower layer's .conv: a subnet MoE there
    built, then failed when the Runner initialised the model."""
    cfg = stock_model_cfg('ddod/ddod_r50_fpn_1x_coco.py')
    with pytest.raises(ValueError, match=r"moe_layers\[0\] at 'bbox_head\.cls_convs': "
                       r"DDODHead\.init_weights reads the layers of its tower 'cls_convs'.*"
                       r"expert='conv' on the tower's convs"):
        build_model(moe_detector('bbox_head.cls_convs', cfg, expert='subnet'))


def test_a_subnet_on_ssds_per_level_convs_is_refused_at_build():
    """SSD's cls_convs holds one stack per level, zipped with the levels: no tower; the
    subnet form built, then crashed in training."""
    from mmengine.config import Config
    import mmdet
    import os.path as osp
    cfg = Config.fromfile(osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', 'ssd',
                                   'ssd300_coco.py')).model
    cfg.backbone.init_cfg = None
    with pytest.raises(ValueError, match=r"bbox_head\.cls_convs.*SSDHead.*one conv stack "
                       r"per level.*expert='conv' on the tower's convs"):
        build_model(moe_detector('bbox_head.cls_convs', cfg, expert='subnet'))
