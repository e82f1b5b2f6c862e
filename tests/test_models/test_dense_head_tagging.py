"""Every dense head that decodes per FPN level tags its detections: ``levels`` and
``expert_weights`` (num_dets, M, N), with boxes, scores and labels those of the
stock decode. The independent computation: the head's own ``predict_by_feat`` for
the boxes, and the gate rows recorded per (image, level) for the tags."""
import pytest
import torch
from mmengine.config import ConfigDict

from helpers import build_model, redraw_parameters, stock_model_cfg
from mmdet_moe.layers import is_moe_module, record_gates

WIDTH = 32
MOE = dict(num_experts=3, top_k=2, gate_cfg=dict(type='TopKGate', noisy=False))
HEADS = {
    'retinanet': ('retinanet/retinanet_r50_fpn_1x_coco.py', ['bbox_head.cls_convs.1.conv']),
    'fcos': ('fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py',
             ['bbox_head.cls_convs.*.conv', 'bbox_head.reg_convs.3.conv']),
    'atss': ('atss/atss_r50_fpn_1x_coco.py', ['bbox_head.reg_convs.0.conv']),
    'gfl': ('gfl/gfl_r50_fpn_1x_coco.py', ['bbox_head.cls_convs.3.conv']),
    'tood': ('tood/tood_r50_fpn_1x_coco.py', ['bbox_head.inter_convs.1.conv']),
    'fsaf': ('fsaf/fsaf_r50_fpn_1x_coco.py', ['bbox_head.reg_convs.0.conv']),
    'vfnet': ('vfnet/vfnet_r50_fpn_1x_coco.py', ['bbox_head.cls_convs.2.conv']),
    'reppoints': ('reppoints/reppoints-moment_r50_fpn_1x_coco.py',
                  ['bbox_head.cls_convs.0.conv']),
    'fovea': ('foveabox/fovea_r50_fpn_4xb4-1x_coco.py', ['bbox_head.cls_convs.1.conv']),
    'autoassign': ('autoassign/autoassign_r50-caffe_fpn_1x_coco.py',
                   ['bbox_head.reg_convs.1.conv']),
}


def batch(model, shapes=((3, 128, 160), (3, 96, 128))):
    from mmdet.testing import demo_mm_inputs
    packed = demo_mm_inputs(len(shapes), [list(s) for s in shapes], num_items=[2] * len(shapes),
                            num_classes=5)
    data = model.data_preprocessor(packed, False)
    return data['inputs'], data['data_samples']


def moe_model(path, paths):
    cfg = stock_model_cfg(path, WIDTH)
    model = build_model(ConfigDict(type='MoEDetector', detector=cfg,
                                   moe_layers=[dict(paths=paths, **MOE)]))
    redraw_parameters(model, seed=2)
    return model.eval()


def expected_weights(head, feats, levels, b):
    """(num_dets, M, N): for each MoE module of the head that routes, the gate row of
    the detection's (image, level), from the records of a plain forward; zeros past a
    module's own number of experts (N: the largest)."""
    with record_gates() as recorder, torch.no_grad():
        head(feats)
    rows = []
    for module in (m for m in head.modules() if is_moe_module(m)):
        records = sorted((r for r in recorder.records if r.module is module),
                         key=lambda r: r.call)
        rows.append(torch.stack([r.weights for r in records])[:, b])  # (L, N_m)
    width = max(r.shape[1] for r in rows)
    return torch.stack([torch.nn.functional.pad(r[levels], (0, width - r.shape[1]))
                        for r in rows], dim=1)


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(HEADS))
def test_dense_head_tags_its_detections(name):
    path, paths = HEADS[name]
    model = moe_model(path, paths)
    head = model.bbox_head
    inputs, samples = batch(model)
    rescale = True
    with torch.no_grad():
        feats = model.extract_feat(inputs)
        stock = head.predict_by_feat(*head(feats), batch_img_metas=[s.metainfo for s in samples],
                                     rescale=rescale)
        tagged = head.predict(feats, samples, rescale=rescale)
    assert sum(len(r) for r in stock) > 0
    for b, (got, want) in enumerate(zip(tagged, stock, strict=True)):
        for key in want.keys():
            torch.testing.assert_close(got[key], want[key])
        assert (got.levels >= 0).all() and (got.levels < len(feats)).all()
        torch.testing.assert_close(got.expert_weights,
                                   expected_weights(head, feats, got.levels, b))


def test_dense_head_without_moe_is_untouched():
    cfg = stock_model_cfg('retinanet/retinanet_r50_fpn_1x_coco.py', WIDTH)
    model = build_model(cfg).eval()
    inputs, samples = batch(model)
    with torch.no_grad():
        result = model.bbox_head.predict(model.extract_feat(inputs), samples, rescale=True)
    assert set(result[0].keys()) == {'bboxes', 'scores', 'labels'}


def test_detector_predict_tags_fcos_detections():
    model = moe_model(*HEADS['fcos'])
    inputs, samples = batch(model)
    with torch.no_grad():
        results = model.predict(inputs, samples)
    assert all({'levels', 'expert_weights'} <= set(r.pred_instances.keys()) for r in results)
    assert results[0].pred_instances.expert_weights.shape[1:] == (5, 3)


PIXEL_LAYERS = {
    'mumoe': dict(type='CPMuMoEConv2d', num_experts=6, gate_mode='pixel',
                  gate_act='softmax', norm=None),
    'moe-conv-dispatch': dict(type='MoEConv2d', num_experts=6, top_k=2, impl='dispatch',
                              gate_cfg=dict(gate_mode='pixel')),
}


@pytest.mark.parametrize('layer', sorted(PIXEL_LAYERS))
def test_per_pixel_gates_tag_each_detection_with_its_location(layer):
    """A conv with per-pixel gates (μMoE, or a top-k MoEConv2d routed per location): each
    detection gets the gate vector at its anchor. With the regression output zeroed,
    every box is its anchor, so the anchor's location (box centre / stride) is known
    independently of the decode."""
    cfg = stock_model_cfg('retinanet/retinanet_r50_fpn_1x_coco.py', WIDTH)
    cfg.bbox_head.anchor_generator.update(octave_base_scale=1, scales_per_octave=1,
                                          ratios=[1.0])
    cfg.test_cfg.update(score_thr=0.0, nms_pre=50, max_per_img=100)
    model = build_model(ConfigDict(type='MoEDetector', detector=cfg, moe_layers=[
        dict(paths='bbox_head.cls_convs.1.conv', **PIXEL_LAYERS[layer])]))
    redraw_parameters(model, seed=3)
    head = model.eval().bbox_head
    torch.nn.init.zeros_(head.retina_reg.weight)
    torch.nn.init.zeros_(head.retina_reg.bias)
    inputs, samples = batch(model)
    with torch.no_grad():
        feats = model.extract_feat(inputs)
        results = head.predict(feats, samples, rescale=False)
        with record_gates() as recorder:
            head(feats)
    maps = [r.pixel_weights for r in sorted(recorder.records, key=lambda r: r.call)]
    strides = [s[0] for s in head.prior_generator.strides]
    checked = 0
    for b, (result, sample) in enumerate(zip(results, samples)):
        assert result.expert_weights.shape[1:] == (1, 6)
        height, width = sample.metainfo['img_shape']
        for box, level, weights in zip(result.bboxes, result.levels, result.expert_weights):
            x1, y1, x2, y2 = box.tolist()
            if x1 <= 0 or y1 <= 0 or x2 >= width or y2 >= height:
                continue  # clipped to the image: its centre is not the anchor's
            stride = strides[level]
            x, y = round((x1 + x2) / 2 / stride), round((y1 + y2) / 2 / stride)
            torch.testing.assert_close(weights[0], maps[level][b, :, y, x])
            checked += 1
    assert checked > 20


def test_rpn_tags_each_proposal_with_its_level_and_gate_row():
    """The RPN keeps its own top-k per level: its proposals are tagged from the level
    of each box. With the regression output zeroed, a proposal is its anchor, whose
    size (8 × stride) gives the level independently."""
    model = moe_model('faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', ['rpn_head.rpn_conv'])
    head = model.rpn_head
    torch.nn.init.zeros_(head.rpn_reg.weight)
    torch.nn.init.zeros_(head.rpn_reg.bias)
    inputs, samples = batch(model)
    with torch.no_grad():
        feats = model.extract_feat(inputs)
        stock = head.predict_by_feat(*head(feats), batch_img_metas=[s.metainfo for s in samples],
                                     rescale=False)
        tagged = head.predict(feats, samples, rescale=False)
    checked = 0
    for b, (got, want, sample) in enumerate(zip(tagged, stock, samples, strict=True)):
        for key in want.keys():
            torch.testing.assert_close(got[key], want[key])
        torch.testing.assert_close(got.expert_weights,
                                   expected_weights(head, feats, got.levels, b))
        height, width = sample.metainfo['img_shape']
        x1, y1, x2, y2 = got.bboxes.unbind(1)
        inside = (x1 > 0) & (y1 > 0) & (x2 < width) & (y2 < height)
        size = ((x2 - x1) * (y2 - y1)).sqrt()[inside]
        levels = torch.log2(size / 32).round().long()
        assert torch.equal(got.levels[inside], levels)
        checked += int(inside.sum())
    assert checked > 20


def test_an_image_whose_rpn_keeps_no_proposal_gets_empty_tags():
    """RPNHead._bbox_post_process builds a new, empty result when no box survives
    (here: min_bbox_size larger than the image); it lost the tags, and the RoI head
    then left the whole batch untagged. The empty proposals keep empty tags."""
    model = moe_model('faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', ['rpn_head.rpn_conv'])
    head = model.rpn_head
    inputs, samples = batch(model)
    head.test_cfg.min_bbox_size = 10_000
    with torch.no_grad():
        tagged = head.predict(model.extract_feat(inputs), samples, rescale=False)
    for got in tagged:
        assert len(got) == 0
        assert got.expert_weights.shape == (0, 1, MOE['num_experts'])
        assert got.levels.shape == (0, )
        assert len(got.metainfo['expert_layers']) == 1


def test_modules_with_different_numbers_of_experts_tag_with_zeros_past_their_own():
    """A pruned layer keeps fewer experts than its neighbours: ``expert_weights`` is as
    wide as the largest N, a narrower module's columns past its own N are 0."""
    cfg = stock_model_cfg(HEADS['fcos'][0], WIDTH)
    model = build_model(ConfigDict(type='MoEDetector', detector=cfg, moe_layers=[
        dict(paths=['bbox_head.cls_convs.1.conv'], **MOE),
        dict(paths=['bbox_head.reg_convs.3.conv'], **dict(MOE, num_experts=4))]))
    redraw_parameters(model, seed=2)
    model.eval()
    head = model.bbox_head
    inputs, samples = batch(model)
    with torch.no_grad():
        feats = model.extract_feat(inputs)
        tagged = head.predict(feats, samples, rescale=True)
    for b, got in enumerate(tagged):
        assert got.expert_weights.shape == (len(got), 2, 4)
        assert (got.expert_weights[:, 0, 3] == 0).all()  # the 3-expert layer
        torch.testing.assert_close(got.expert_weights,
                                   expected_weights(head, feats, got.levels, b))
