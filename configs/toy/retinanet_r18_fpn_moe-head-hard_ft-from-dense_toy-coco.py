# The paper's hard constraint, fine-tuned from the dense toy RetinaNet: as the soft arm,
# but experts whose running relative importance exceeds tau=0.3 are switched off, the
# gate computed as the paper's FCGate (FC on GAP(ReLU(x))), no noise, no balance loss.
_base_ = './retinanet_r18_fpn_moe-head-soft_ft-from-dense_toy-coco.py'

model = dict(
    bbox_head=dict(
        gate_cfg=dict(_delete_=True, type='RelativeImportanceGate', threshold=0.3,
                      gate_type='paper_fc'),
        balance_cfg=None))
