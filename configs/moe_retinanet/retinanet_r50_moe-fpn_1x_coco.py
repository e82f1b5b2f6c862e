# MoE FPN: the 3×3 output conv of every pyramid level (and the extra levels) is a
# MoEConv2d with N=4 experts, k=2 per image, one gate per level.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_moe'], allow_failed_imports=False)

model = dict(
    type='MoERetinaNet',
    neck=dict(
        type='MoEFPN',
        moe_parts=['output', 'extra'],
        num_experts=4,
        top_k=2,
        gate_cfg=dict(type='TopKGate', noisy=True),
        balance_cfg=dict(importance=0.5)))

# tools/test.py --tta: DetTTAModel's merge, keeping each detection's level, gate
# weights and view (what ExpertSizeStatsHook needs)
tta_model = dict(type='MoEDetTTAModel',
                 tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
