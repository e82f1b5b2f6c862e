# "Mixed": MoE experts in both branches, each branch with its own gate.
_base_ = './retinanet_r50_moe-cls-head_1x_coco.py'
model = dict(bbox_head=dict(moe_branches='both'))
