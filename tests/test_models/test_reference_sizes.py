"""Per-level reference sizes s_l of dense heads built from mmdet's own configs."""
import math
import os.path as osp

import mmdet
import pytest
from mmengine.config import Config

from helpers import ROOT, build_model, stock_model_cfg
from mmdet_moe.models import (NoReferenceSizes, detector_reference_sizes,
                              level_reference_sizes)


def head(path):
    """The bbox_head of mmdet's config ``path``, built alone (no backbone)."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    cfg = Config.fromfile(osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', path))
    return MODELS.build(cfg.model.bbox_head)


def test_retinanet_levels_are_four_strides():
    # octave_base_scale 4 on strides 8..128: the smallest anchor of each octave
    assert level_reference_sizes(head('retinanet/retinanet_r50_fpn_1x_coco.py')) == \
        [32.0, 64.0, 128.0, 256.0, 512.0]


def test_atss_levels_are_eight_strides():
    assert level_reference_sizes(head('atss/atss_r50_fpn_1x_coco.py')) == \
        [64.0, 128.0, 256.0, 512.0, 1024.0]


def test_fcos_points_get_four_strides():
    assert level_reference_sizes(head('fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py')) == \
        [32.0, 64.0, 128.0, 256.0, 512.0]


def test_anchors_without_octave_are_the_geometric_mean_of_their_sizes():
    from mmdet.models.task_modules.prior_generators import AnchorGenerator

    class Head:  # anchors with explicit scales: √(w·h) = base_size × scale
        prior_generator = AnchorGenerator(strides=[8, 16], ratios=[0.5, 1.0, 2.0],
                                          scales=[2.0, 8.0])
    sizes = level_reference_sizes(Head())
    assert sizes == pytest.approx([8 * math.sqrt(2 * 8), 16 * math.sqrt(2 * 8)])


def test_heads_and_detectors_without_levels_say_why():
    class Head:
        prior_generator = None
    with pytest.raises(NoReferenceSizes, match='no anchor or point prior generator'):
        level_reference_sizes(Head())

    class TwoStage:  # no MoE in the RoI head, an RPN without a prior generator
        roi_head = object()
        rpn_head = Head()
    with pytest.raises(NoReferenceSizes, match='no anchor or point prior generator'):
        detector_reference_sizes(TwoStage())

    class NoHead:
        pass
    with pytest.raises(NoReferenceSizes, match='no dense bbox_head'):
        detector_reference_sizes(NoHead())


def test_two_stage_levels_are_the_rpns_or_the_roi_extractors():
    """The toy Faster R-CNN with MoE RoI-head convs: its detections carry the level their
    RoI was pooled from, which the extractor picks by size against finest_scale × 2^l;
    without MoE in the RoI head they carry their proposal's RPN level."""
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'toy',
                                   'faster-rcnn_r18_fpn_moe-roi-head_4e_toy-coco.py'))
    model = build_model(cfg.model)
    finest = model.roi_head.bbox_roi_extractor.finest_scale
    assert detector_reference_sizes(model) == [finest * 2 ** level for level in range(4)]
    dense = build_model(Config.fromfile(osp.join(
        ROOT, 'configs', 'toy', '_base_', 'faster-rcnn_r18_fpn_toy.py')).model)
    assert detector_reference_sizes(dense) == level_reference_sizes(dense.rpn_head)


def test_cascade_levels_are_the_first_stages_extractors():
    """A cascade's detections carry the level their first stage pooled from: s_l is
    that extractor's finest_scale × 2^l (it raised for the per-stage ModuleList)."""
    from mmengine.config import ConfigDict

    from helpers import stock_model_cfg
    cfg = stock_model_cfg('cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py', 32)
    model = build_model(ConfigDict(type='MoEDetector', detector=cfg, moe_layers=[
        dict(paths='roi_head.bbox_head.1.shared_convs.0.conv', num_experts=2)]))
    finest = model.roi_head.bbox_roi_extractor[0].finest_scale
    assert detector_reference_sizes(model) == [finest * 2 ** level for level in range(4)]


def test_sparse_rcnn_levels_are_its_last_stage_extractors():
    """Its detections carry the level their query's last RoI was pooled from."""
    cfg = stock_model_cfg('sparse_rcnn/sparse-rcnn_r50_fpn_1x_coco.py')  # ResNet-18
    cfg.roi_head.update(num_stages=2, stage_loss_weights=[1, 1],
                        bbox_head=cfg.roi_head.bbox_head[:2])
    model = build_model(cfg)
    model.roi_head.bbox_roi_extractor[1].finest_scale = 28  # differs from the first's
    assert detector_reference_sizes(model) == [28.0, 56.0, 112.0, 224.0]
