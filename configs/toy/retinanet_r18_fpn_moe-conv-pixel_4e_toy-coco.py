# Toy MoE RetinaNet with single-conv experts routed per location: as
# retinanet_r18_fpn_moe-head_4e_toy-coco.py (N=4, k=2, importance loss w=0.5, here over
# locations), but only the last classification tower conv is a MoEConv2d, and its gate
# (a 1×1 conv on each location's features, noisy top-k) picks k experts for every
# location of every FPN level. impl='auto' runs each location through its k experts.
_base_ = './retinanet_r18_fpn_moe-head_4e_toy-coco.py'

model = dict(
    bbox_head=dict(expert_type='conv', moe_convs=(0, ),
                   gate_cfg=dict(type='TopKGate', noisy=True, gate_mode='pixel')))
