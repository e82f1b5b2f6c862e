"""Sparse R-CNN's query head and TridentNet's branch merge tag their detections, with
the stock boxes, scores and labels."""
import pytest
import torch
from mmengine.config import ConfigDict
from mmengine.structures import InstanceData

from helpers import build_model, import_tool, redraw_parameters, with_resnet18
from mmdet.models.roi_heads import SparseRoIHead, StandardRoIHead, TridentRoIHead
from mmdet.testing import demo_mm_inputs
from mmdet_moe.layers import MoEConv2d, assign_moe_names, record_gates
from mmdet_moe.models import untagged_layers_reason
from mmdet_moe.models.necks.neck_tagging import recording_neck_gates

MOE = dict(num_experts=3, top_k=2, gate_cfg=dict(type='TopKGate', noisy=False))


def census_model_cfg(family):
    """The census's stock config of ``family`` (no pretrained weights, score
    thresholds 0, its fixes)."""
    return import_tool('moe_census').stock_model_cfg(family)


def batch(model, shapes):
    packed = demo_mm_inputs(len(shapes), [list(s) for s in shapes],
                            num_items=[2] * len(shapes), num_classes=5)
    data = model.data_preprocessor(packed, False)
    return data['inputs'], data['data_samples']


def sparse_rcnn(neck_moe=True, family='sparse_rcnn', width=64):
    """Sparse R-CNN (or QueryInst) on ResNet-18, ``width`` channels, 2 stages of 30
    queries, 20 detections per image (QueryInst: one per query, as its head needs),
    with the census's neck form (a ``MoEConv2d`` in every FPN conv)."""
    cfg = with_resnet18(census_model_cfg(family))
    if neck_moe:
        cfg.neck.conv_cfg = dict(type='MoEConv2d', **MOE)
    roi_head = cfg.roi_head
    cfg.neck.out_channels = roi_head.bbox_roi_extractor.out_channels = width
    cfg.rpn_head.update(num_proposals=30, proposal_feature_channel=width)
    roi_head.update(num_stages=2, stage_loss_weights=[1, 1], proposal_feature_channel=width,
                    bbox_head=roi_head.bbox_head[:2])
    for stage in roi_head.bbox_head:
        stage.update(in_channels=width, feedforward_channels=2 * width)
    for stage in roi_head.bbox_head + roi_head.get('mask_head', [])[:2]:
        stage.dynamic_conv_cfg.update(in_channels=width, feat_channels=width // 4,
                                      out_channels=width)
    if 'mask_head' in roi_head:
        roi_head.mask_roi_extractor.out_channels = width
        roi_head.mask_head = roi_head.mask_head[:2]
        for stage in roi_head.mask_head:
            stage.update(in_channels=width, conv_out_channels=width)
    cfg.test_cfg.rcnn.max_per_img = 30 if 'mask_head' in roi_head else 20
    model = build_model(cfg)
    redraw_parameters(model, seed=4)
    model.rpn_head.init_weights()  # the learned boxes: whole images, as mmdet starts
    assign_moe_names(model)  # for direct head calls, as forward does
    return model.eval()


def last_stage(head, feats, metas, proposals):
    """Independently of the tagging, from mmdet's own ``SparseRoIHead.predict_bbox``
    (hooks on the last stage): its detections, the last stage's RoIs and class
    scores (B, queries, classes)."""
    seen = {}
    hooks = [head.bbox_roi_extractor[-1].register_forward_pre_hook(
                 lambda _, args: seen.update(rois=args[1])),
             head.bbox_head[-1].register_forward_hook(
                 lambda _, __, out: seen.update(scores=out[0].sigmoid()))]
    try:
        stock = SparseRoIHead.predict_bbox.__wrapped__(head, feats, metas, proposals,
                                                       head.test_cfg, rescale=False)
    finally:
        for hook in hooks:
            hook.remove()
    return stock, seen['rois'], seen['scores']


def neck_row(records, name, b, level):
    """The gate row of neck module ``name`` for image ``b``'s detections of ``level``:
    the module's row if it computes that level's map (``*_convs.<level>``), else 0."""
    weights = records[name][b]
    return weights if int(name.split('.')[2]) == level else torch.zeros_like(weights)


def test_sparse_rcnn_tags_each_query_with_the_neck_gates_of_its_last_rois_level():
    """Each detection's query is found from the last stage's scores (its score at its
    label), independently of the recorded top-k; its tag is the neck's gate row of
    the level that query's last RoI was pooled from."""
    model = sparse_rcnn()
    head = model.roi_head
    inputs, samples = batch(model, [[3, 128, 160], [3, 96, 128]])
    metas = [s.metainfo for s in samples]
    with torch.no_grad():
        with record_gates() as recorder, recording_neck_gates(model):
            feats = model.extract_feat(inputs)
            results = head.predict_bbox(feats, metas, model.rpn_head.predict(feats, samples),
                                        head.test_cfg)
        stock, rois, scores = last_stage(head, feats, metas,
                                         model.rpn_head.predict(feats, samples))
    records = {r.name: r.weights for r in recorder.records}
    assert len(records) == 8  # 4 laterals, 4 output convs
    pooled = head.bbox_roi_extractor[-1].map_roi_levels(rois, 4)
    assert len(set(pooled.tolist())) > 1  # the tags differ by level
    for b, (result, want) in enumerate(zip(results, stock, strict=True)):
        for key in ('bboxes', 'scores', 'labels'):
            assert type(result[key]) is torch.Tensor
            torch.testing.assert_close(result[key], want[key], rtol=0, atol=0)
        assert result.metainfo['expert_layers'] == list(records)
        gap = (scores[b][:, result.labels] - result.scores).abs()  # (queries, dets)
        closest = gap.topk(2, dim=0, largest=False)
        assert (closest.values[0] < 1e-6).all() and (closest.values[1] > 1e-6).all()
        mine = (rois[:, 0] == b).nonzero()[:, 0]
        levels = pooled[mine[closest.indices[0]]]
        assert torch.equal(result.levels, levels)
        want_tags = torch.stack([torch.stack([neck_row(records, name, b, int(level))
                                              for name in records])
                                 for level in levels])
        torch.testing.assert_close(result.expert_weights, want_tags)


def test_sparse_rcnn_predicts_tagged_detections_and_no_query_is_left_untagged():
    """Through the detector's forward (which records the neck's gates); a batch
    without proposals gets (0, M, N) tags; the census's reason line is gone."""
    model = sparse_rcnn()
    inputs, samples = batch(model, [[3, 128, 128]])
    with torch.no_grad():
        (pred, ) = [s.pred_instances for s in model(inputs, samples, mode='predict')]
        with recording_neck_gates(model):
            feats = model.extract_feat(inputs)
            empty = model.rpn_head.predict(feats, samples)[0][:0]
            (none, ) = model.roi_head.predict_bbox(feats, [samples[0].metainfo], [empty],
                                                   model.roi_head.test_cfg)
    assert len(pred) == 20 and pred.expert_weights.shape == (20, 8, 3)
    # a detection's row of each level's modules: the gate row, or zeros elsewhere
    torch.testing.assert_close(pred.expert_weights.sum((1, 2)), torch.full((20, ), 2.))
    assert len(none) == 0 and none.expert_weights.shape == (0, 8, 3)
    assert untagged_layers_reason(model) is None
    # no path reaches a DIIHead (it has no conv); a MoE module put there is not tagged
    model.roi_head.bbox_head[1].extra = MoEConv2d(8, 8, 1, **MOE)
    assert untagged_layers_reason(model) == (
        "SparseRCNN: SparseRoIHead tags its detections with the neck's gates only, not "
        "with its bbox heads' MoE modules: those layers keep per-image rows")


def test_sparse_rcnn_without_moe_gives_mmdets_exact_detections():
    model = sparse_rcnn(neck_moe=False)
    inputs, samples = batch(model, [[3, 128, 128]])
    with torch.no_grad():
        (pred, ) = [s.pred_instances for s in model(inputs, samples, mode='predict')]
        feats = model.extract_feat(inputs)
        (want, ) = SparseRoIHead.predict_bbox.__wrapped__(
            model.roi_head, feats, [samples[0].metainfo],
            model.rpn_head.predict(feats, samples), model.roi_head.test_cfg, rescale=True)
    assert set(pred.keys()) == {'bboxes', 'scores', 'labels'}
    for key in ('bboxes', 'scores', 'labels'):
        assert torch.equal(pred[key], want[key])


@pytest.mark.slow
def test_queryinst_predicts_tagged_detections_with_mmdets_masks():
    """QueryInst's head is Sparse R-CNN's with masks: the same tags; its masks, boxes,
    scores and labels are those of its head called directly, which records no neck
    gates and so runs mmdet's own code."""
    # mmdet's CPU mask paste fails where every box lies off the image (the census met
    # it); at width 64 these random weights give such boxes, at 256 they do not
    model = sparse_rcnn(family='queryinst', width=256)
    inputs, samples = batch(model, [[3, 128, 128]] * 2)
    with torch.no_grad():
        preds = [s.pred_instances for s in model(inputs, samples, mode='predict')]
        feats = model.extract_feat(inputs)
        stock = model.roi_head.predict(feats, model.rpn_head.predict(feats, samples),
                                       samples, rescale=True)
    for pred, want in zip(preds, stock, strict=True):
        assert 'expert_weights' not in want
        for key in ('bboxes', 'scores', 'labels', 'masks'):
            assert type(pred[key]) is torch.Tensor and torch.equal(pred[key], want[key])
        assert pred.expert_weights.shape == (30, 8, 3)
        torch.testing.assert_close(pred.expert_weights.sum((1, 2)), torch.full((30, ), 2.))
    assert untagged_layers_reason(model) is None


def trident_head(max_per_img=5):
    """A TridentRoIHead with only what its merge reads."""
    head = TridentRoIHead.__new__(TridentRoIHead)
    head.test_cfg = ConfigDict(nms=dict(type='nms', iou_threshold=0.5),
                               max_per_img=max_per_img)
    return head


def branch_result(seed, num, tagged=True):
    gen = torch.Generator().manual_seed(seed)
    corners = torch.rand(num, 2, generator=gen) * 100
    result = InstanceData(
        bboxes=torch.cat([corners, corners + 5 + 40 * torch.rand(num, 2, generator=gen)], 1),
        scores=torch.rand(num, generator=gen), labels=torch.randint(3, (num, ), generator=gen))
    if tagged:
        result.expert_weights = torch.rand(num, 2, 3, generator=gen)
        result.levels = torch.full((num, ), seed)
        result.set_metainfo(dict(expert_layers=['rpn_head.rpn_conv', 'roi']))
    return result


@pytest.mark.parametrize('max_per_img', [5, 100])
def test_trident_merge_keeps_the_tags_of_the_branch_detections_nms_keeps(max_per_img):
    """Each merged detection is found among the branches' by its box and score."""
    branches = [branch_result(seed, 12) for seed in range(3)]
    head = trident_head(max_per_img)
    merged = head.merge_trident_bboxes(branches)
    stock = TridentRoIHead.merge_trident_bboxes.__wrapped__(head, branches)
    assert 5 <= len(merged) < 36 and set(merged.keys()) == set(branches[0].keys())
    for key in ('bboxes', 'scores', 'labels'):
        assert torch.equal(merged[key], stock[key])
    every = InstanceData.cat(branches)
    for det in range(len(merged)):
        (row, ) = ((every.bboxes == merged.bboxes[det]).all(1) &
                   (every.scores == merged.scores[det])).nonzero()[:, 0]
        assert torch.equal(merged.expert_weights[det], every.expert_weights[row])
        assert merged.levels[det] == row // 12  # the branch, as set above
    assert merged.metainfo['expert_layers'] == ['rpn_head.rpn_conv', 'roi']


def test_trident_merge_of_untagged_or_empty_branches():
    head = trident_head()
    untagged = [branch_result(seed, 4, tagged=False) for seed in range(3)]
    merged = head.merge_trident_bboxes(untagged)
    stock = TridentRoIHead.merge_trident_bboxes.__wrapped__(head, untagged)
    assert set(merged.keys()) == {'bboxes', 'scores', 'labels'}
    for key in merged.keys():
        assert torch.equal(merged[key], stock[key])
    empty = head.merge_trident_bboxes([branch_result(seed, 0) for seed in range(3)])
    assert len(empty) == 0 and empty.expert_weights.shape == (0, 2, 3)


@pytest.mark.slow
def test_tridentnet_detections_carry_the_rpn_gates_of_their_branch():
    """All three branches tested: a detection's tag is the RPN conv's gate row of the
    branch image it comes from, found by matching it among mmdet's own (untagged)
    branch detections."""
    cfg = census_model_cfg('tridentnet')
    cfg.backbone.test_branch_idx = cfg.roi_head.test_branch_idx = -1
    cfg.test_cfg.rcnn.max_per_img = 30
    cfg.test_cfg.rpn.update(nms_pre=100, max_per_img=30)
    model = build_model(ConfigDict(type='MoEDetector', detector=cfg, moe_layers=[
        dict(MOE, paths=['rpn_head.rpn_conv'])]))
    redraw_parameters(model, seed=4)
    with torch.no_grad():  # C4 features of hundreds saturate gates, scores and boxes
        for name in ('rpn_conv.gate', 'rpn_cls', 'rpn_reg'):
            for weight in model.rpn_head.get_submodule(name).parameters():
                weight.mul_(1e-2)
        for name in ('fc_cls', 'fc_reg'):
            for weight in model.roi_head.bbox_head.get_submodule(name).parameters():
                weight.mul_(1e-2)
    model.eval()
    inputs, samples = batch(model, [[3, 128, 160]])
    with torch.no_grad(), record_gates() as recorder:
        (pred, ) = {id(s.pred_instances): s.pred_instances
                    for s in model(inputs, samples, mode='predict')}.values()
    (rpn_gates, ) = [r.weights for r in recorder.records if r.name == 'rpn_head.rpn_conv']
    assert rpn_gates.shape == (3, 3) and not torch.allclose(rpn_gates[0], rpn_gates[1])
    head = model.roi_head
    with torch.no_grad():
        feats = model.extract_feat(inputs)
        proposals = model.rpn_head.predict(feats, samples * 3, rescale=False)
        branches = StandardRoIHead.predict_bbox.__wrapped__(
            head, feats, [samples[0].metainfo] * 3,
            [InstanceData(bboxes=p.bboxes) for p in proposals], head.test_cfg, rescale=True)
    stock = TridentRoIHead.merge_trident_bboxes.__wrapped__(head, branches)
    assert len(pred) > 0
    for key in ('bboxes', 'scores', 'labels'):
        assert torch.equal(pred[key], stock[key])
    branch_of = torch.cat([torch.full((len(b), ), k) for k, b in enumerate(branches)])
    every = InstanceData.cat(branches)
    rows = [((every.bboxes == box).all(1) & (every.scores == score)).nonzero()[:, 0]
            for box, score in zip(pred.bboxes, pred.scores)]
    assert all(len(row) == 1 for row in rows)
    branch = branch_of[torch.cat(rows)]
    assert len(set(branch.tolist())) > 1
    torch.testing.assert_close(pred.expert_weights[:, 0], rpn_gates[branch])
    assert (pred.levels == 0).all()  # TridentNet's one (C4) level
    assert pred.metainfo['expert_layers'] == ['rpn_head.rpn_conv']
    assert untagged_layers_reason(model) is None
