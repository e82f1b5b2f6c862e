# Single-conv experts (the paper's conv4 variant): only the 4th conv of each tower is
# replaced by N=4 256→256 convs with bias (ReLU after the mix), k=2 per image and
# level. Linear experts run fused (one grouped conv with the mixed kernel). Gate and
# loss are this project's (linear gate, importance loss); the paper's conv4 run
# (mixed_moe_last_layer.py) used its FCGate (gate_type='paper_fc') with KL to uniform.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_moe'], allow_failed_imports=False)

model = dict(
    type='MoERetinaNet',
    bbox_head=dict(
        type='MoERetinaHead',
        moe_branches='both',
        expert_type='conv',
        moe_convs=[3],
        num_experts=4,
        top_k=2,
        impl='fused',
        gate_cfg=dict(type='TopKGate', noisy=True),
        balance_cfg=dict(importance=0.5)))

# tools/test.py --tta: DetTTAModel's merge, keeping each detection's level, gate
# weights and view (what ExpertSizeStatsHook needs)
tta_model = dict(type='MoEDetTTAModel',
                 tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
