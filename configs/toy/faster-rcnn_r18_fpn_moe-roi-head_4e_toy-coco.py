# Toy MoE Faster R-CNN, MoE in the second stage: the last two convs of the RoI bbox
# head as MoEConv2d, N=4 experts, k=2 per RoI (the gate sees each RoI's pooled
# features: per-object routing), importance loss w=0.5. Each detection is tagged with
# its RoI's gate weights and the FPN level the RoI was pooled from. impl='dispatch'
# runs each expert on its RoIs (the fused impl would build one kernel per RoI).
_base_ = './_base_/faster-rcnn_r18_fpn_toy.py'

model = dict(
    type='MoEDetector',
    detector_type='FasterRCNN',  # the base's model keys stay flat beside it
    moe_layers=[
        dict(paths=['roi_head.bbox_head.shared_convs.2.conv',
                    'roi_head.bbox_head.shared_convs.3.conv'],
             num_experts=4, top_k=2, impl='dispatch', balance_cfg=dict(importance=0.5))
    ])

custom_hooks = [
    dict(type='ExpertSizeStatsHook', score_thr=0.3),
    dict(type='ExpertUtilisationHook', interval=50),
]
