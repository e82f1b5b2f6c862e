# The paper's baseline without a gate, fine-tuned from the dense toy RetinaNet: the 4
# subnet experts all run on every (image, level), averaged with equal weights 1/4.
_base_ = './retinanet_r18_fpn_moe-head-soft_ft-from-dense_toy-coco.py'

model = dict(
    bbox_head=dict(
        top_k=4, gate_cfg=dict(_delete_=True, type='EqualWeightGate'), balance_cfg=None))
