# Hard constraint instead of an auxiliary loss: experts whose running relative
# importance exceeds tau=0.3 are switched off for the next batch (no gate noise).
_base_ = './retinanet_r50_moe-cls-head_1x_coco.py'
model = dict(
    bbox_head=dict(
        gate_cfg=dict(_delete_=True, type='RelativeImportanceGate', threshold=0.3),
        balance_cfg=None))
