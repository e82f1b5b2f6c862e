# "Mixed": MoE experts in both branches, each branch with its own gate. The paper's
# mixed runs (mixed_moe.py) used its FCGate (gate_type='paper_fc', noisy) and KL to
# uniform, w=0.25 per branch, where this config keeps the linear gate and importance loss.
_base_ = './retinanet_r50_moe-cls-head_1x_coco.py'
model = dict(bbox_head=dict(moe_branches='both'))
