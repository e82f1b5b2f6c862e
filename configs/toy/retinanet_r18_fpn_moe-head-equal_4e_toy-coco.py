# Toy baseline without a gate: the 4 subnet experts of the MoE variants all run on
# every (image, level), averaged with equal weights 1/4 (the paper's comparison).
_base_ = './retinanet_r18_fpn_moe-head_4e_toy-coco.py'

model = dict(
    bbox_head=dict(
        top_k=4, gate_cfg=dict(_delete_=True, type='EqualWeightGate'), balance_cfg=None))
