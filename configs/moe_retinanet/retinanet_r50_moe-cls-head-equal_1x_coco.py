# The paper's baseline without a gate: the 4 classification-branch experts all run,
# averaged with equal weights 1/4 (EqualWeightGate). Compare with the gated MoE and
# with each expert alone (tools/analyze_experts.py --per-expert).
_base_ = './retinanet_r50_moe-cls-head_1x_coco.py'
model = dict(
    bbox_head=dict(
        top_k=4, gate_cfg=dict(_delete_=True, type='EqualWeightGate'), balance_cfg=None))
