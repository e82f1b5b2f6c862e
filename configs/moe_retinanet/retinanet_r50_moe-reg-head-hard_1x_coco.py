# Hard constraint instead of an auxiliary loss, as the paper's RetinaNet code does it:
# its FCGate (W·GAP(ReLU(x)) + b, no noise) and relative importance with tau=0.3,
# updated after each FPN level (level_updates='sequential', the default); experts over
# tau are switched off for the next level. Differs (docs/paper_fidelity.md): at most
# N-k experts are switched off (the paper: every one over tau), and fresh experts get
# mmdet's head init with the focal-loss prior (the paper: PyTorch's default init).
_base_ = './retinanet_r50_moe-reg-head_1x_coco.py'
model = dict(
    bbox_head=dict(
        gate_cfg=dict(_delete_=True, type='RelativeImportanceGate', threshold=0.3,
                      gate_type='paper_fc'),
        balance_cfg=None))
