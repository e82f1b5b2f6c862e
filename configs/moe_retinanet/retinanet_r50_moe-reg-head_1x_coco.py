# As the cls variant, with MoE experts in the regression branch.
_base_ = './retinanet_r50_moe-cls-head_1x_coco.py'
model = dict(bbox_head=dict(moe_branches='reg'))
