"""Two-stage detectors tag their detections: through the proposal (MoE in the RPN)
and the RoI (MoE in the bbox head of each stage, one gate row per RoI), with the
stock boxes."""
import numpy as np
import pytest
import torch
from mmengine.config import ConfigDict
from mmengine.structures import InstanceData

from helpers import build_model, one_training_step, redraw_parameters, stock_model_cfg
from mmdet.models.roi_heads import (CascadeRoIHead, GridRoIHead,
                                    HybridTaskCascadeRoIHead, MultiInstanceRoIHead,
                                    SCNetRoIHead, SparseRoIHead, StandardRoIHead,
                                    TridentRoIHead)
from mmdet.structures.bbox import bbox2roi
from mmdet_moe.engine.hooks.gate_rows import rows_by_layer
from mmdet_moe.layers import GateRecorder, assign_moe_names, record_gates
from mmdet_moe.models.roi_heads import roi_head_tags_detections

MOE = dict(num_experts=3, top_k=2, gate_cfg=dict(type='TopKGate', noisy=False))
PATHS = ['rpn_head.rpn_conv', 'roi_head.bbox_head.shared_convs.0.conv']
CASCADE = 'cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py'
HTC = 'htc/htc-without-semantic_r50_fpn_1x_coco.py'


def two_stage(path, paths, **moe):
    """mmdet's detector ``path`` at width 32 with MoE layers at ``paths`` (``MOE``
    updated with ``moe``)."""
    cfg = stock_model_cfg(path, 32)
    cfg.test_cfg.rcnn.update(score_thr=0.0, max_per_img=50)
    cfg.test_cfg.rpn.update(nms_pre=100, max_per_img=30)
    model = build_model(ConfigDict(type='MoEDetector', detector=cfg,
                                   moe_layers=[dict(MOE, paths=paths, **moe)]))
    redraw_parameters(model, seed=4)
    assign_moe_names(model)  # for direct head calls, as forward does
    return model.eval()


def faster_rcnn(paths=PATHS):
    return two_stage('faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', paths)


def batch(model, shapes=([3, 128, 160], [3, 96, 128])):
    from mmdet.testing import demo_mm_inputs
    packed = demo_mm_inputs(2, list(shapes), num_items=[2, 2], num_classes=5)
    data = model.data_preprocessor(packed, False)
    return data['inputs'], data['data_samples']


def test_detections_are_the_stock_ones_with_tags():
    model = faster_rcnn()
    inputs, samples = batch(model)
    metas = [s.metainfo for s in samples]
    with torch.no_grad():
        feats = model.extract_feat(inputs)
        rpn = model.rpn_head
        proposals = rpn.predict_by_feat(*rpn(feats), batch_img_metas=metas, rescale=False)
        stock = StandardRoIHead.predict_bbox.__wrapped__(
            model.roi_head, feats, metas, proposals, model.roi_head.test_cfg, rescale=True)
        tagged = [s.pred_instances for s in model(inputs, samples, mode='predict')]
    assert sum(map(len, stock)) > 0
    for got, want in zip(tagged, stock, strict=True):
        for key in ('bboxes', 'scores', 'labels'):
            torch.testing.assert_close(got[key], want[key])
        assert got.expert_weights.shape == (len(got), 2, 3)
        assert got.metainfo['expert_layers'] == PATHS


def test_each_detection_has_its_proposals_and_its_rois_gates():
    """With the box regression zeroed a detection's box is its proposal's, which
    identifies the RoI independently of the tagging."""
    model = faster_rcnn()
    head = model.roi_head
    torch.nn.init.zeros_(head.bbox_head.fc_reg.weight)
    torch.nn.init.zeros_(head.bbox_head.fc_reg.bias)
    inputs, samples = batch(model)
    metas = [s.metainfo for s in samples]
    with torch.no_grad():
        feats = model.extract_feat(inputs)
        proposals = model.rpn_head.predict(feats, samples, rescale=False)
        results = head.predict_bbox(feats, metas, proposals, head.test_cfg, rescale=False)
        rois = bbox2roi([p.bboxes for p in proposals])
        with record_gates() as recorder:
            head._bbox_forward(feats, rois)
    (record,) = recorder.records
    pooled = head.bbox_roi_extractor.map_roi_levels(rois, 4)
    start = 0
    for b, result in enumerate(results):
        boxes = proposals[b].bboxes
        roi = torch.cdist(result.bboxes, boxes).argmin(1)
        torch.testing.assert_close(result.bboxes, boxes[roi], atol=1e-3, rtol=0)
        torch.testing.assert_close(result.expert_weights[:, 0], proposals[b].expert_weights[roi, 0])
        torch.testing.assert_close(result.expert_weights[:, 1], record.weights[start + roi])
        assert torch.equal(result.levels, pooled[start + roi])
        start += len(boxes)


def test_rpn_moe_alone_tags_with_the_proposal_level():
    model = faster_rcnn(PATHS[:1])
    inputs, samples = batch(model)
    with torch.no_grad():
        pred = model(inputs, samples, mode='predict')[0].pred_instances
    assert pred.expert_weights.shape[1:] == (1, 3)
    assert pred.metainfo['expert_layers'] == PATHS[:1]
    assert (pred.levels >= 0).all() and (pred.levels < 5).all()


def test_per_object_rows_average_per_image_in_the_statistics():
    recorder = GateRecorder()
    recorder.add('roi', torch.tensor([[1., 0.], [0., 1.], [.5, .5]]))
    recorder.records[0].row_images = torch.tensor([0, 0, 1])
    layer = rows_by_layer(recorder, num_images=3)['roi']
    np.testing.assert_allclose(layer.image_row(0), [.5, .5])
    np.testing.assert_allclose(layer.image_row(1), [.5, .5])
    np.testing.assert_allclose(layer.image_row(2), [0, 0])  # no RoI


def test_rpn_and_roi_layers_with_different_numbers_of_experts():
    """RPN MoE with 3 experts, RoI MoE with 4: the RPN's tags get a zero fourth column."""
    cfg = stock_model_cfg('faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', 32)
    cfg.test_cfg.rcnn.update(score_thr=0.0, max_per_img=50)
    model = build_model(ConfigDict(type='MoEDetector', detector=cfg, moe_layers=[
        dict(paths=PATHS[:1], **MOE), dict(paths=PATHS[1:], **dict(MOE, num_experts=4))]))
    redraw_parameters(model, seed=4)
    model.eval()
    inputs, samples = batch(model)
    with torch.no_grad():
        pred = model(inputs, samples, mode='predict')[0].pred_instances
    assert len(pred) and pred.expert_weights.shape[1:] == (2, 4)
    assert (pred.expert_weights[:, 0, 3] == 0).all()
    torch.testing.assert_close(pred.expert_weights[:, 0, :3].sum(-1),
                               torch.ones(len(pred)))
    torch.testing.assert_close(pred.expert_weights[:, 1].sum(-1), torch.ones(len(pred)))


def stage_outputs(head, feats, metas, proposals):
    """Independently of the tagging, from mmdet's own ``CascadeRoIHead.predict_bbox``
    (forward hooks): the gate records, each stage's class logits per RoI and the
    boxes the last stage regresses from its RoIs (class-agnostic, (num_rois, 4))."""
    logits, last = [], {}

    def bbox_head_out(_, __, out):
        logits.append(out[0])
        last['deltas'] = out[1]

    hooks = [stage.register_forward_hook(bbox_head_out) for stage in head.bbox_head]
    hooks.append(head.bbox_roi_extractor[-1].register_forward_pre_hook(
        lambda _, args: last.update(rois=args[1])))
    try:
        with record_gates() as recorder:
            CascadeRoIHead.predict_bbox.__wrapped__(head, feats, metas, proposals,
                                                    head.test_cfg, rescale=False)
    finally:
        for hook in hooks:
            hook.remove()
    boxes = head.bbox_head[-1].bbox_coder.decode(
        last['rois'][:, 1:], last['deltas'], max_shape=metas[0]['img_shape'])
    return recorder, logits, boxes


@pytest.mark.parametrize('path,paths', [
    (CASCADE, ['rpn_head.rpn_conv']),
    (CASCADE, ['roi_head.bbox_head.1.shared_convs.0.conv']),
    (CASCADE, ['rpn_head.rpn_conv', 'roi_head.bbox_head.0.shared_convs.0.conv',
               'roi_head.bbox_head.2.shared_convs.3.conv']),
    (HTC, ['rpn_head.rpn_conv', 'roi_head.bbox_head.2.shared_convs.1.conv'])])
def test_cascade_tags_each_detection_with_its_proposal_and_stage_rois(path, paths):
    """The stock boxes, scores and labels, tagged with the gate rows of their RoI at
    every stage. Each detection's RoI is found independently of the NMS indices: its
    box is the one the last stage regresses from that RoI, and its score the softmax
    of the RoI's class logits averaged over the stages, at its label."""
    model = two_stage(path, paths)
    head = model.roi_head
    inputs, samples = batch(model, shapes=[[3, 128, 128]] * 2)  # one img_shape
    metas = [s.metainfo for s in samples]
    with torch.no_grad():
        feats = model.extract_feat(inputs)
        proposals = model.rpn_head.predict(feats, samples, rescale=False)
        results = head.predict_bbox(feats, metas, proposals, head.test_cfg, rescale=False)
        recorder, logits, boxes = stage_outputs(head, feats, metas, proposals)
        stock = CascadeRoIHead.predict_bbox.__wrapped__(head, feats, metas, proposals,
                                                        head.test_cfg, rescale=False)
    rpn_layers = paths[:1] if paths[0].startswith('rpn_head') else []
    rows = {r.name: r.weights for r in recorder.records}
    assert len(logits) == 3 and sorted(rows) == sorted(paths[len(rpn_layers):])
    rois = bbox2roi([p.bboxes for p in proposals])
    probs = torch.stack(logits).mean(0).softmax(-1)
    pooled = head.bbox_roi_extractor[0].map_roi_levels(rois, 4)
    assert sum(map(len, results)) > 0
    for b, (result, want) in enumerate(zip(results, stock, strict=True)):
        for key in ('bboxes', 'scores', 'labels'):
            torch.testing.assert_close(result[key], want[key], rtol=0, atol=0)
        assert result.metainfo['expert_layers'] == paths
        mine = (rois[:, 0] == b).nonzero()[:, 0]
        gap = ((probs[mine][:, result.labels] - result.scores).abs() +  # (RoIs, dets)
               (boxes[mine, None] - result.bboxes).abs().sum(-1))
        closest = gap.topk(2, dim=0, largest=False)
        assert (closest.values[0] < 1e-4).all() and (closest.values[1] > 1e-2).all()
        local = closest.indices[0]
        parts = [proposals[b].expert_weights[local]] if rpn_layers else []
        parts += [rows[name][mine[local], None] for name in paths[len(rpn_layers):]]
        torch.testing.assert_close(result.expert_weights, torch.cat(parts, 1))
        levels = pooled[mine[local]] if rows else proposals[b].levels[local]
        assert torch.equal(result.levels, levels)


@pytest.mark.slow
def test_cascade_rcnn_trained_a_step_tags_its_detections_and_rows_per_image():
    """Issue 28: a Cascade R-CNN with MoE in its RPN and a stage's bbox head, after a
    training step, predicted untagged detections. The per-RoI gate records say the
    image of each row, as the standard head's do."""
    paths = ['rpn_head.rpn_conv', 'roi_head.bbox_head.2.shared_convs.0.conv']
    model = two_stage(CASCADE, paths, balance_cfg=dict(importance=0.5))
    losses, _ = one_training_step(model)
    assert 'loss_moe_importance' in losses
    model.eval()
    inputs, samples = batch(model)
    with torch.no_grad(), record_gates() as recorder:
        preds = [s.pred_instances for s in model(inputs, samples, mode='predict')]
    for pred in preds:
        assert len(pred) and pred.expert_weights.shape == (len(pred), 2, 3)
        assert pred.metainfo['expert_layers'] == paths
    (roi_record,) = [r for r in recorder.records if r.name == paths[1]]
    assert roi_record.row_images.tolist() == sorted(roi_record.row_images.tolist())
    assert set(roi_record.row_images.tolist()) == {0, 1}


def features_and_proposals(model):
    """(image metas, features, the RPN's proposals) of a batch, without gradients."""
    inputs, samples = batch(model)
    with torch.no_grad():
        feats = model.extract_feat(inputs)
        proposals = model.rpn_head.predict(feats, samples, rescale=False)
    return [s.metainfo for s in samples], feats, proposals


@pytest.mark.parametrize('path,paths', [
    ('faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', PATHS),
    (CASCADE, ['rpn_head.rpn_conv', 'roi_head.bbox_head.1.shared_convs.0.conv'])])
def test_an_image_without_proposals_gets_empty_tags(path, paths):
    """Defect: an image without proposals calls no multiclass_nms, and the tagging,
    which expected one call per image, stopped with a RuntimeError. It gets no
    detections and (0, M, N) tags; the other image's are those of a batch without it."""
    model = two_stage(path, paths)
    head = model.roi_head
    metas, feats, proposals = features_and_proposals(model)
    with torch.no_grad():
        empty = proposals[1][proposals[1].scores < 0]
        empty.set_metainfo(proposals[1].metainfo)
        first, none = head.predict_bbox(feats, metas, [proposals[0], empty],
                                        head.test_cfg)
        alone = head.predict_bbox([f[:1] for f in feats], metas[:1], proposals[:1],
                                  head.test_cfg)[0]
    assert len(first) and len(none) == 0
    assert none.expert_weights.shape == (0, 2, 3) and none.levels.shape == (0, )
    for key in ('bboxes', 'scores', 'labels', 'expert_weights', 'levels'):
        torch.testing.assert_close(first[key], alone[key])


def test_cascade_without_rcnn_test_cfg_gives_mmdets_untagged_scores():
    model = two_stage(CASCADE, ['roi_head.bbox_head.0.shared_convs.0.conv'])
    head = model.roi_head
    metas, feats, proposals = features_and_proposals(model)
    with torch.no_grad():
        got = head.predict_bbox(feats, metas, proposals, None)
        want = CascadeRoIHead.predict_bbox.__wrapped__(head, feats, metas, proposals,
                                                       None)
    for g, w in zip(got, want, strict=True):
        assert set(g.keys()) == set(w.keys()) == {'bboxes', 'scores'}
        assert torch.equal(g.scores, w.scores) and torch.equal(g.bboxes, w.bboxes)


def test_roi_heads_whose_predict_bbox_the_plugin_tags():
    tagged = (StandardRoIHead, CascadeRoIHead, HybridTaskCascadeRoIHead, SCNetRoIHead,
              SparseRoIHead, TridentRoIHead)
    untagged = (GridRoIHead, MultiInstanceRoIHead)  # own predict_bbox
    for cls in tagged + untagged:
        assert roi_head_tags_detections(cls.__new__(cls)) == (cls in tagged), cls
    assert not roi_head_tags_detections(torch.nn.Identity())  # no RoI head


@pytest.mark.slow
@pytest.mark.parametrize('path,width,paths', [
    ('cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py', 32,
     ['rpn_head.rpn_conv', 'roi_head.bbox_head.2.shared_convs.0.conv']),
    ('htc/htc_r50_fpn_1x_coco.py', 32,
     ['rpn_head.rpn_conv', 'roi_head.bbox_head.0.shared_convs.0.conv']),
    # SCNet's bbox heads are FCs only, and their feature relay needs its own head
    ('scnet/scnet_r50_fpn_1x_coco.py', None, ['rpn_head.rpn_conv'])])
def test_cascade_mask_rcnn_semantic_htc_and_scnet_predict_tagged_masks(path, width, paths):
    cfg = stock_model_cfg(path, width)
    cfg.test_cfg.rcnn.update(score_thr=0.0, max_per_img=20)
    cfg.test_cfg.rpn.update(nms_pre=100, max_per_img=30)
    model = build_model(ConfigDict(type='MoEDetector', detector=cfg,
                                   moe_layers=[dict(MOE, paths=paths)]))
    redraw_parameters(model, seed=4)
    model.eval()
    assert roi_head_tags_detections(model.roi_head)
    inputs, samples = batch(model, shapes=[[3, 128, 128]] * 2)
    with torch.no_grad():
        preds = [s.pred_instances for s in model(inputs, samples, mode='predict')]
    for pred in preds:
        assert len(pred) and len(pred.masks) == len(pred)
        assert pred.expert_weights.shape == (len(pred), len(paths), 3)
        assert pred.metainfo['expert_layers'] == paths
