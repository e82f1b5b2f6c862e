# Toy RetinaNet with a MoE FPN under the stock RetinaHead: every lateral, output and
# extra conv of the neck as MoEConv2d, N=4 experts, k=2 per (image, FPN level), one
# gate per conv, importance loss w=0.5. Each detection is tagged with the gate rows of
# the neck convs that computed its level (its lateral and output conv, or its extra
# conv; see docs/expert_analysis.md), so the statistics written after validation have
# the per-detection and level-controlled views of the neck; expert usage is logged in
# training.
_base_ = './_base_/retinanet_r18_fpn_toy.py'

model = dict(
    neck=dict(
        type='MoEFPN',
        moe_parts=['lateral', 'output', 'extra'],
        num_experts=4,
        top_k=2,
        balance_cfg=dict(importance=0.5)))

custom_hooks = [
    dict(type='ExpertSizeStatsHook', score_thr=0.3),
    dict(type='ExpertUtilisationHook', interval=50),
]
