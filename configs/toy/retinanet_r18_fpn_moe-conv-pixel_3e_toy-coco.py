# Toy MoE RetinaNet with single-conv experts routed per location: the last
# classification tower conv as a MoEConv2d of N=4 experts, k=2 for every location of
# every FPN level (a 1×1-conv gate on the location's features, noisy top-k), importance
# loss w=0.5 over locations. impl='auto' picks all-experts-as-one-conv or each
# location's k experts by the measured speed (see docs/benchmarks.md).
_base_ = './_base_/retinanet_r18_fpn_toy.py'

model = dict(
    type='MoERetinaNet',
    bbox_head=dict(
        type='MoERetinaHead',
        moe_branches='cls',
        expert_type='conv',
        moe_convs=(1, ),
        num_experts=4,
        top_k=2,
        gate_cfg=dict(type='TopKGate', noisy=True, gate_mode='pixel'),
        balance_cfg=dict(importance=0.5)))
find_unused_parameters = True

custom_hooks = [
    dict(type='ExpertSizeStatsHook', score_thr=0.3),
    dict(type='ExpertUtilisationHook', interval=50),
]
