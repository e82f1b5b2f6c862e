"""Heads with their own ``predict_by_feat`` (YOLOX, YOLOv3, PAA, CenterNet, YOLACT,
SABL, CornerNet), and RTMDet, tag their detections with the level and gate weights of
the prior each comes from, and keep mmdet's boxes, scores and labels. The independent
computation: with the box regression set to a constant, every box is its prior
(YOLOv3, YOLACT: its anchor at its cell; CenterNet: its peak; RTMDet: a square of two
strides; SABL: a square of 18/7 strides), so its size gives the level and its centre
the location, and the gates are read from the records of a plain forward at that
(image, level, location). CornerNet decodes its last level only."""
import math
import os.path as osp

import pytest
import torch
from mmdet.models.dense_heads import RetinaHead
from mmengine.config import Config

from helpers import build_model, redraw_parameters
from mmdet_moe.layers import is_moe_module, record_gates
from mmdet_moe.models.dense_heads.expert_tagging import tags_detections, untagged_reason
from mmdet_moe.models.dense_heads.own_decodes import match_rows
from mmdet_moe.models.insertion import insert_moe_layers

SIZE, WIDTH = 128, 32
MOE = dict(num_experts=3, top_k=2, gate_cfg=dict(type='TopKGate', noisy=False))
PIXEL = dict(type='MoEConv2d', num_experts=4, top_k=2, impl='dispatch',
             gate_cfg=dict(gate_mode='pixel'))


def stock_model(path):
    """The ``model`` of mmdet's config ``path``, score_thr 0 where it has one."""
    import mmdet
    model = Config.fromfile(osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs',
                                     path)).model
    if 'score_thr' in model.test_cfg:
        model.test_cfg.score_thr = 0.0
    return model


def head_cfg(path, **changes):
    """The ``bbox_head`` of mmdet's config ``path`` with its ``test_cfg``."""
    model = stock_model(path)
    model.bbox_head.update(num_classes=5, test_cfg=model.test_cfg, **changes)
    return model.bbox_head


def insert_moe(head, path, moe):
    """The conv at ``path`` becomes a MoE conv of ``moe`` (None: stays dense)."""
    if moe is not None:
        insert_moe_layers(head, [dict(paths=path, **moe)])


def zero(*tensors):
    for tensor in tensors:
        tensor.zero_()


def yolox(moe):
    """YOLOX with one MoE conv at every level (as RTMDet's ``share_conv`` shares)."""
    head = build_model(head_cfg('yolox/yolox_tiny_8xb8-300e_coco.py', in_channels=WIDTH,
                                feat_channels=WIDTH))
    insert_moe(head, 'multi_level_cls_convs.0.0.conv', moe)
    for convs in head.multi_level_cls_convs[1:]:
        convs[0].conv = head.multi_level_cls_convs[0][0].conv
    return head, lambda: zero(*head.multi_level_conv_reg.parameters())


def yolov3(moe):
    head = build_model(head_cfg('yolo/yolov3_d53_8xb8-ms-608-273e_coco.py',
                                in_channels=[WIDTH] * 3, out_channels=[WIDTH] * 3))
    insert_moe(head, 'convs_bridge.0.conv', moe)
    for bridge in head.convs_bridge[1:]:
        bridge.conv = head.convs_bridge[0].conv
    return head, lambda: zero(*[t for conv in head.convs_pred for t in (  # x, y, w, h
        conv.weight.view(3, -1, WIDTH)[:, :4], conv.bias.view(3, -1)[:, :4])])


def paa(moe, score_voting=False):
    cfg = head_cfg('paa/paa_r50_fpn_1x_coco.py', in_channels=WIDTH, feat_channels=WIDTH,
                   score_voting=score_voting)
    cfg.anchor_generator.octave_base_scale = 1  # anchors as large as the stride
    head = build_model(cfg)
    insert_moe(head, 'cls_convs.1.conv', moe)
    return head, lambda: zero(*head.atss_reg.parameters())


def centernet(moe):
    head = build_model(head_cfg('centernet/centernet_r18_8xb16-crop512-140e_coco.py',
                                in_channels=WIDTH, feat_channels=WIDTH))
    # a per-pixel MoE conv returns a channels-last map, which CenterNet's decode cannot
    # ``view`` where the heatmap comes from it: per-pixel gates in its size branch
    path = 'wh_head.0' if moe is PIXEL else 'heatmap_head.0'
    insert_moe(head, path, moe)
    return head, lambda: zero(*head.offset_head[2].parameters())


def rtmdet(moe):
    """RTMDet decodes per level (``filter_scores_and_topk``); its shared convs are
    shared again after the MoE conv replaced one of them."""
    head = build_model(head_cfg('rtmdet/rtmdet_tiny_8xb32-300e_coco.py', in_channels=WIDTH,
                                feat_channels=WIDTH))
    insert_moe(head, 'cls_convs.0.0.conv', moe)
    for convs in head.cls_convs[1:]:
        convs[0].conv = head.cls_convs[0][0].conv

    def boxes_twice_the_stride():  # distances of one stride to each side
        for conv in head.rtm_reg:
            zero(conv.weight)
            conv.bias.fill_(1.0)
    return head, boxes_twice_the_stride


def yolact(moe):
    head = build_model(head_cfg('yolact/yolact_r50_1xb8-55e_coco.py', in_channels=WIDTH,
                                feat_channels=WIDTH))
    insert_moe(head, 'head_convs.0.conv', moe)
    return head, lambda: zero(*head.conv_reg.parameters())


def sabl(moe):
    """SABL decodes per level as mmdet's base (its own predict_by_feat splits the box
    predictions); with its bucket scores and offsets zero, a box is a square of 18/7
    strides about its anchor's centre."""
    head = build_model(head_cfg('sabl/sabl-retinanet_r50_fpn_1x_coco.py', in_channels=WIDTH,
                                feat_channels=WIDTH))
    insert_moe(head, 'cls_convs.0.conv', moe)
    return head, lambda: zero(*head.retina_bbox_reg.parameters(),
                              *head.retina_bbox_cls.parameters())


HEADS = {'yolox': (yolox, [8, 16, 32]), 'yolov3': (yolov3, [32, 16, 8]),
         'paa': (paa, [8, 16, 32, 64, 128]), 'centernet': (centernet, [4]),
         'rtmdet': (rtmdet, [8, 16, 32]), 'yolact': (yolact, [8, 16, 32, 64, 128]),
         'sabl': (sabl, [8, 16, 32, 64, 128])}


def make(name, moe=MOE, priors_as_boxes=True, **kwargs):
    """(head, features of two 128-px images, strides); with ``priors_as_boxes``, the
    regression set so that each box is (a fixed function of) its prior."""
    build, strides = HEADS[name]
    head, set_regression = build(moe, **kwargs)
    redraw_parameters(head, seed=4)
    if priors_as_boxes:
        with torch.no_grad():
            set_regression()
    gen = torch.Generator().manual_seed(5)
    feats = tuple(torch.randn(2, WIDTH, SIZE // s, SIZE // s, generator=gen)
                  for s in strides)
    return head.eval(), feats, strides


def samples():
    from mmdet.structures import DetDataSample
    meta = dict(img_shape=(SIZE, SIZE), ori_shape=(SIZE, SIZE), scale_factor=(1.0, 1.0),
                batch_input_shape=(SIZE, SIZE), border=(0, 0, 0, 0))
    return [DetDataSample(metainfo=meta) for _ in range(2)]


def prior_of(name, head, strides, box):
    """(level, y, x) of the prior of a box (regression set by ``make``), or None where
    the box was clipped to the image."""
    x1, y1, x2, y2 = box.tolist()
    width, cx, cy = x2 - x1, (x1 + x2) / 2, (y1 + y2) / 2
    if name == 'yolov3':  # its anchor: the anchor's size says the level
        sizes = head.prior_generator.base_sizes
        level = next(i for i, level_sizes in enumerate(sizes)
                     if any(math.isclose(width, w, rel_tol=1e-4) for w, _ in level_sizes))
    elif name == 'centernet':
        level = 0
    elif name == 'yolact':  # an anchor's area: (3 × its level's base size)²
        if min(x1, y1) <= 0 or max(x2, y2) >= SIZE:
            return None
        level = round(math.log2(math.sqrt(width * (y2 - y1)) / 24))
        (stride, _), (centre, _) = (head.prior_generator.strides[level],
                                    head.prior_generator.centers[level])
        return level, round((cy - centre) / stride), round((cx - centre) / stride)
    else:
        if min(x1, y1) <= 0 or max(x2, y2) >= SIZE - 1:  # (SABL clips to SIZE - 1)
            return None
        size = dict(rtmdet=width / 2, sabl=width * 7 / 18).get(name, width)
        level = next(i for i, s in enumerate(strides) if math.isclose(size, s, rel_tol=1e-4))
    stride, offset = strides[level], 0.5 if name == 'yolov3' else 0.0  # prior centres
    return level, round(cy / stride - offset), round(cx / stride - offset)


def stock_and_tagged(head, feats):
    metas = [s.metainfo for s in samples()]
    with torch.no_grad():
        stock = head.predict_by_feat(*head(feats), batch_img_metas=metas, rescale=True)
        tagged = head.predict(feats, samples(), rescale=True)
    return stock, tagged


def assert_stock(tagged, stock):
    assert sum(len(r) for r in stock) > 0
    for got, want in zip(tagged, stock, strict=True):
        assert set(got.keys()) == set(want.keys()) | {'levels', 'expert_weights'}
        for key in want.keys():
            assert torch.equal(got[key], want[key]), key


def assert_stock_untagged(stock, result):
    """Detections (some) exactly the stock decode's, without tags."""
    assert sum(len(r) for r in stock) > 0
    for got, want in zip(result, stock, strict=True):
        assert 'expert_weights' not in got
        for key in want.keys():
            assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize('gates', ['image', 'pixel'])
@pytest.mark.parametrize('name', sorted(HEADS))
def test_own_decode_tags_each_detection_with_its_prior(name, gates):
    head, feats, strides = make(name, MOE if gates == 'image' else PIXEL)
    assert tags_detections(head) and untagged_reason(head) is None
    stock, tagged = stock_and_tagged(head, feats)
    assert_stock(tagged, stock)
    with record_gates() as recorder, torch.no_grad():
        head(feats)
    moe = next(m for m in head.modules() if is_moe_module(m))
    records = sorted((r for r in recorder.records if r.module is moe), key=lambda r: r.call)
    assert len(records) == len(strides)
    checked = 0
    for b, result in enumerate(tagged):
        assert result.expert_weights.shape[1] == 1
        assert len(result.metainfo['expert_layers']) == 1
        for box, level, weights in zip(result.bboxes, result.levels, result.expert_weights):
            prior = prior_of(name, head, strides, box)
            if prior is None:
                continue
            assert int(level) == prior[0]
            record = records[prior[0]]
            want = (record.weights[b] if gates == 'image'
                    else record.pixel_weights[b, :, prior[1], prior[2]])
            torch.testing.assert_close(weights[0], want)
            checked += 1
    assert checked > 20


@pytest.mark.parametrize('name', sorted(HEADS))
def test_own_decode_levels_differ_and_output_is_stock_with_regression(name):
    """Trained-like boxes (regression not zeroed): boxes, scores and labels are mmdet's,
    and detections come from several levels (CenterNet has one)."""
    head, feats, strides = make(name, priors_as_boxes=False)
    stock, tagged = stock_and_tagged(head, feats)
    assert_stock(tagged, stock)
    levels = torch.cat([r.levels for r in tagged])
    assert len(levels.unique()) > 1 or len(strides) == 1


def test_paa_score_voting_reorders_tags_with_its_detections():
    """Score voting moves boxes and regroups detections per class, keeping scores and
    labels: each detection keeps the tags it has without voting."""
    head, feats, _ = make('paa', score_voting=True)
    stock, voted = stock_and_tagged(head, feats)
    assert_stock(voted, stock)
    head.with_score_voting = False
    _, plain = stock_and_tagged(head, feats)
    for got, want in zip(voted, plain, strict=True):
        assert len(got) == len(want) > 0
        key = lambda r: torch.argsort(r.scores * 10 + r.labels, stable=True)  # noqa: E731
        got, want = got[key(got)], want[key(want)]
        assert torch.equal(got.scores, want.scores) and torch.equal(got.labels, want.labels)
        assert torch.equal(got.levels, want.levels)
        assert torch.equal(got.expert_weights, want.expert_weights)


@pytest.mark.parametrize('name', sorted(HEADS))
def test_head_without_moe_predicts_stock_untagged(name):
    head, feats, _ = make(name, moe=None, priors_as_boxes=False)
    assert not tags_detections(head)
    assert untagged_reason(head) == (f'{type(head).__name__} holds no MoE module and no '
                                     'MoE FPN neck feeds it: nothing to tag')
    stock, result = stock_and_tagged(head, feats)
    for got, want in zip(result, stock, strict=True):
        assert set(got.keys()) == set(want.keys())
        for key in want.keys():
            assert torch.equal(got[key], want[key])


def test_a_kept_row_is_the_one_bit_identical_row_or_an_error():
    table = torch.tensor([[0., 0, 4, 4], [1, 1, 5, 5], [2, 2, 6, 6], [1, 1, 5, 5]])
    assert match_rows(table[[2, 0, 2]], table, 'boxes').tolist() == [2, 0, 2]
    with pytest.raises(RuntimeError, match=r'1 of 2 kept YOLOXHead boxes match no row or '
                                           r'several rows of the 4 decoded ones'):
        match_rows(table[[0, 1]], table, 'YOLOXHead boxes')  # row 1 is also row 3
    with pytest.raises(RuntimeError, match='1 of 1 kept'):
        match_rows(table[:1] + 0.5, table, 'boxes')


def cornernet(moe, seed=4):
    """CornerNet's head on two feature levels (two Hourglass stacks), the first conv of
    each level's top-left pooling a MoE conv, and 32-px maps of two images."""
    model = stock_model('cornernet/cornernet_hourglass104_8xb6-210e-mstest_coco.py')
    model.bbox_head.update(num_classes=5, in_channels=WIDTH, test_cfg=model.test_cfg)
    head = build_model(model.bbox_head)
    insert_moe(head, ['tl_pool.0.conv1.conv', 'tl_pool.1.conv1.conv'], moe)
    redraw_parameters(head, seed=seed)
    gen = torch.Generator().manual_seed(5)
    feats = [torch.randn(2, WIDTH, 32, 32, generator=gen) for _ in range(2)]
    return head.eval(), feats


def test_cornernet_tags_each_detection_with_its_last_level_gates():
    """Corner pairs come from the last level (the earlier stack's serves only
    intermediate supervision): each detection's tag is that (image, level) gate row of
    the last level's MoE conv, and a row of zeros for the first level's (it fed none;
    both levels' maps have one size: the convs' places in the per-level lists say
    which level each serves)."""
    head, feats = cornernet(MOE)
    assert tags_detections(head) and untagged_reason(head) is None
    stock, tagged = stock_and_tagged(head, feats)
    assert_stock(tagged, stock)
    with record_gates() as recorder, torch.no_grad():
        head(feats)
    last = head.tl_pool[1].conv1.conv
    record, = [r for r in recorder.records if r.module is last]
    for b, result in enumerate(tagged):
        assert (result.levels == 1).all()
        assert not result.expert_weights[:, 0].any()
        torch.testing.assert_close(result.expert_weights[:, 1],
                                   record.weights[b].expand(len(result), -1))


def test_cornernet_per_pixel_gates_leave_the_batch_untagged():
    """A corner pair has no one location for a per-pixel gate: mmdet's detections,
    untagged (the log says why)."""
    head, feats = cornernet(PIXEL, seed=5)  # a draw with corner pairs
    assert_stock_untagged(*stock_and_tagged(head, feats))


class OwnPredict(RetinaHead):
    def predict_by_feat(self, *args, **kwargs):
        return super().predict_by_feat(*args, **kwargs)


class OwnSingle(RetinaHead):
    def _predict_by_feat_single(self, *args, **kwargs):
        return super()._predict_by_feat_single(*args, **kwargs)


@pytest.mark.parametrize('cls,why', [
    (OwnPredict, 'decodes with its own predict_by_feat, whose kept priors the tagging '
                 'does not read'),
    (OwnSingle, "keeps priors in its _predict_by_feat_single otherwise than mmdet's "
                'filter_scores_and_topk')])
def test_untagged_reason_of_a_decode_the_tagging_does_not_read(cls, why):
    """A subclass that overrides the decode is not read, even if it calls the stock one:
    the tagging cannot know what it keeps."""
    head = cls(num_classes=5, in_channels=WIDTH, stacked_convs=1, feat_channels=WIDTH)
    insert_moe(head, 'cls_convs.0.conv', MOE)
    assert not tags_detections(head)
    assert untagged_reason(head) == f'{cls.__name__} {why}: its statistics keep per-image rows'


@pytest.mark.slow
@pytest.mark.parametrize('path,conv', [
    ('paa/paa_r50_fpn_1x_coco.py', 'bbox_head.cls_convs.0.conv'),
    ('centernet/centernet_r18_8xb16-crop512-140e_coco.py', 'bbox_head.heatmap_head.0')])
def test_detector_trained_one_step_tags_its_detections(path, conv):
    """The issue's reproduction: a MoE detector, one training step, a predict."""
    from mmengine.config import ConfigDict
    from helpers import one_training_step, predict, stock_model_cfg
    if 'paa' in path:  # ResNet-18, narrow
        cfg = stock_model_cfg(path, WIDTH)
        cfg.test_cfg.score_thr = 0.0
    else:
        cfg = stock_model(path)
        cfg.backbone.init_cfg = None  # no pretrained weights
    model = build_model(ConfigDict(type='MoEDetector', detector=cfg, moe_layers=[
        dict(paths=conv, num_experts=4, top_k=2, balance_cfg=dict(importance=0.5))]))
    one_training_step(model)
    for sample in predict(model):
        pred = sample.pred_instances
        assert len(pred) > 0 and pred.expert_weights.shape == (len(pred), 1, 4)
        assert pred.metainfo['expert_layers'] == [conv]
        torch.testing.assert_close(pred.expert_weights.sum(-1), torch.ones(len(pred), 1))


def test_boxes_several_priors_decode_to_leave_the_batch_untagged_not_failing():
    """YOLOv3's decoded boxes can tie (sizes overflowing to inf early in training, as
    the census met): which prior a kept box comes from is then unknown. The prediction
    must not fail: the batch goes untagged, as mmdet predicts it (it raised)."""
    head, feats, _ = make('yolov3', priors_as_boxes=False)
    with torch.no_grad():  # exp(200) overflows: every box is infinitely large
        for conv in head.convs_pred:
            conv.bias.view(3, -1)[:, 2:4] = 200.0
    assert_stock_untagged(*stock_and_tagged(head, feats))
