# Toy MoE FCOS, MoE anywhere by config: the last conv of both head towers (of 2) as
# MoEConv2d, N=4 experts, k=2 per (image, FPN level), importance loss w=0.5. Each
# detection is tagged with its FPN level and gate weights; gate statistics against
# object sizes are written after validation, expert usage logged in training.
_base_ = './_base_/fcos_r18_fpn_toy.py'

model = dict(
    type='MoEDetector',
    detector_type='FCOS',  # the base's model keys stay flat beside it
    moe_layers=[
        dict(paths=['bbox_head.cls_convs.1.conv', 'bbox_head.reg_convs.1.conv'],
             num_experts=4, top_k=2, balance_cfg=dict(importance=0.5))
    ])

custom_hooks = [
    dict(type='ExpertSizeStatsHook', score_thr=0.3),
    dict(type='ExpertUtilisationHook', interval=50),
]
