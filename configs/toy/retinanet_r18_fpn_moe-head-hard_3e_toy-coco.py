# Toy MoE RetinaNet, hard constraint: as the soft variant, but experts whose running
# relative importance exceeds tau=0.3 are switched off (no balance loss, no noise).
_base_ = './retinanet_r18_fpn_moe-head_3e_toy-coco.py'

model = dict(
    bbox_head=dict(
        gate_cfg=dict(_delete_=True, type='RelativeImportanceGate', threshold=0.3),
        balance_cfg=None))
