# Toy MoE RetinaNet, soft constraint: the classification branch (its conv + output
# conv) as N=4 whole-subnet experts, k=2 per (image, FPN level), one noisy gate shared
# over levels, importance (CV²) loss w=0.5; this project's linear gate, not the paper's
# (its RetinaNet runs used SimpleGate and KL to uniform: gate_type='paper_simple',
# balance_cfg=dict(kl_uniform=0.5); see docs/paper_fidelity.md). Gate statistics against
# object sizes are written after validation (ExpertSizeStatsHook); expert usage is
# logged in training.
_base_ = './_base_/retinanet_r18_fpn_toy.py'

model = dict(
    type='MoERetinaNet',
    bbox_head=dict(
        type='MoERetinaHead',
        moe_branches='cls',
        expert_type='subnet',
        num_experts=4,
        top_k=2,
        gate_cfg=dict(type='TopKGate', noisy=True),
        balance_cfg=dict(importance=0.5)))
find_unused_parameters = True

custom_hooks = [
    dict(type='ExpertSizeStatsHook', score_thr=0.3),
    dict(type='ExpertUtilisationHook', interval=50),
]
