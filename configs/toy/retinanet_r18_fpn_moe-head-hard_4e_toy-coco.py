# Toy MoE RetinaNet, hard constraint as the paper's RetinaNet code: its FCGate
# (gate_type='paper_fc': W·GAP(ReLU(x)) + b, no noise), no balance loss, and experts
# whose running relative importance exceeds tau=0.3 switched off for the next FPN
# level (at most N-k of them here; see docs/paper_fidelity.md). Otherwise as the soft
# variant.
_base_ = './retinanet_r18_fpn_moe-head_4e_toy-coco.py'

model = dict(
    bbox_head=dict(
        gate_cfg=dict(_delete_=True, type='RelativeImportanceGate', threshold=0.3,
                      gate_type='paper_fc', noisy=False),
        balance_cfg=None))
