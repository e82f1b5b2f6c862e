# MoE anywhere: Faster R-CNN whose RPN conv is a MoEConv2d (one gate per FPN level
# call, shared over levels as the RPN head is).
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_moe'], allow_failed_imports=False)

model = dict(
    type='MoEDetector',
    detector_type='FasterRCNN',  # the base's model keys stay flat beside it
    moe_layers=[
        dict(paths='rpn_head.rpn_conv', num_experts=4, top_k=2,
             balance_cfg=dict(importance=0.5))
    ])

# tools/test.py --tta: DetTTAModel's merge, keeping each detection's level, gate
# weights and view (what ExpertSizeStatsHook needs)
tta_model = dict(type='MoEDetTTAModel',
                 tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
