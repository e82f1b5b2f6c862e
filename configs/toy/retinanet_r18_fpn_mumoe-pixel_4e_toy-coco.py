# Toy RetinaNet whose last classification tower conv is a CP μMoE layer (Oldfield et
# al.): 16 experts mixed softly per location by an entmax-1.5 gate (sparse weights,
# no top-k), factorised so the cost is about two convs of the CP rank's width
# whatever the number of experts. No balance loss (μMoE has none).
_base_ = './_base_/retinanet_r18_fpn_toy.py'

model = dict(
    type='MoEDetector',
    detector_type='RetinaNet',  # the base's model keys stay flat beside it
    moe_layers=[
        dict(paths='bbox_head.cls_convs.0.conv', type='CPMuMoEConv2d', num_experts=16,
             gate_mode='pixel')
    ])

custom_hooks = [
    dict(type='ExpertSizeStatsHook', score_thr=0.3),
    dict(type='ExpertUtilisationHook', interval=50),
]
