"""Two-stage detectors tag their detections: through the proposal (MoE in the RPN)
and the RoI (MoE in the bbox head, one gate row per RoI), with the stock boxes."""
import numpy as np
import torch
from mmengine.config import ConfigDict

from helpers import build_model, redraw_parameters, stock_model_cfg
from mmdet.models.roi_heads import StandardRoIHead
from mmdet.structures.bbox import bbox2roi
from mmdet_moe.engine.hooks.gate_rows import rows_by_layer
from mmdet_moe.layers import GateRecorder, record_gates

MOE = dict(num_experts=3, top_k=2, gate_cfg=dict(type='TopKGate', noisy=False))
PATHS = ['rpn_head.rpn_conv', 'roi_head.bbox_head.shared_convs.0.conv']


def faster_rcnn(paths=PATHS):
    cfg = stock_model_cfg('faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', 32)
    cfg.test_cfg.rcnn.update(score_thr=0.0, max_per_img=50)
    cfg.test_cfg.rpn.update(nms_pre=100, max_per_img=30)
    model = build_model(ConfigDict(type='MoEDetector', detector=cfg,
                                   moe_layers=[dict(paths=paths, **MOE)]))
    redraw_parameters(model, seed=4)
    return model.eval()


def batch(model):
    from mmdet.testing import demo_mm_inputs
    packed = demo_mm_inputs(2, [[3, 128, 160], [3, 96, 128]], num_items=[2, 2], num_classes=5)
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
