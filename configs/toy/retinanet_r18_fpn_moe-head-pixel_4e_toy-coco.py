# Toy MoE RetinaNet routed per location: as retinanet_r18_fpn_moe-head_4e_toy-coco.py
# (the classification branch as N=4 whole-subnet experts, importance loss w=0.5), but
# the gate picks k=2 experts for every location of every FPN level, not one pair per
# (image, level). Each expert tower then runs on the whole map and the outputs are
# mixed per location: 4 towers' compute, where per-image routing runs 2.
_base_ = './retinanet_r18_fpn_moe-head_4e_toy-coco.py'

model = dict(bbox_head=dict(gate_cfg=dict(type='TopKGate', noisy=True, gate_mode='pixel')))
