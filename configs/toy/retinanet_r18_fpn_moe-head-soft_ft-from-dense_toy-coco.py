# The paper's soft constraint, fine-tuned from the dense toy RetinaNet (see the base):
# the classification branch as N=4 whole-subnet experts, k=2 per (image, FPN level),
# the paper's SimpleGate (gate_type='paper_simple': noisy, on GAP features), KL
# divergence to uniform with weight 0.5 (one branch).
# Experts are copied from the dense branch when the dense checkpoint loads
# (upcycle_noise_std: noise × std of each tensor; tools/demo_paper.py sets it, and
# loads a checkpoint without the branch for fresh experts).
_base_ = './retinanet_r18_fpn_ft-from-dense_toy-coco.py'

model = dict(
    train_only=None,
    train_only_moe=True,
    bbox_head=dict(
        type='MoERetinaHead',
        moe_branches='cls',
        expert_type='subnet',
        num_experts=4,
        top_k=2,
        gate_cfg=dict(type='TopKGate', noisy=True, gate_type='paper_simple'),
        balance_cfg=dict(kl_uniform=0.5),
        upcycle_noise_std=0.0))
find_unused_parameters = True

custom_hooks = [
    dict(type='ExpertSizeStatsHook', score_thr=0.3),
    dict(type='ExpertUtilisationHook', interval=50),
]
