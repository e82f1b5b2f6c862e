# MoE RetinaNet head (Pavlitska et al.): the classification branch (4 conv3×3+ReLU and
# the output conv) becomes N=4 whole-subnet experts, k=2 per (image, FPN level), one
# noisy top-k gate shared by all levels, soft constraint: importance (CV²) loss (w=0.5).
# Gate and loss are this project's defaults: the paper's RetinaNet runs used its
# SimpleGate with KL to uniform (gate_type='paper_simple', balance_cfg=
# dict(kl_uniform=0.5)), as ..._ft-from-dense_coco.py does; see docs/paper_fidelity.md.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_moe'], allow_failed_imports=False)

model = dict(
    type='MoERetinaNet',
    bbox_head=dict(
        type='MoERetinaHead',
        moe_branches='cls',
        expert_type='subnet',
        experts_include_output=True,
        num_experts=4,
        top_k=2,
        gate_cfg=dict(type='TopKGate', noisy=True),
        balance_cfg=dict(importance=0.5)))

# sparse routing leaves some experts without gradient in a step
find_unused_parameters = True

# tools/test.py --tta: DetTTAModel's merge, keeping each detection's level, gate
# weights and view (what ExpertSizeStatsHook needs)
tta_model = dict(type='MoEDetTTAModel',
                 tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
