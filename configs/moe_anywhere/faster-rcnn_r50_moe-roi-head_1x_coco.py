# MoE anywhere in the second stage: Faster R-CNN whose RoI bbox head is
# Shared4Conv1FCBBoxHead (4 shared convs, then one FC; the stock Shared2FC head has no
# conv) with its last two convs as MoEConv2d experts. The gate sees each RoI's pooled
# features: one routing decision per RoI, i.e. per object (4 experts, k=2, importance
# loss 0.5). Detections are tagged with their RoI's gate weights and pooled level.
# impl='dispatch' runs each expert on its RoIs: the fused impl would build one
# 256×256×3×3 kernel per RoI (~2.4 GB per layer for 2 images × 512 RoIs).
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_moe'], allow_failed_imports=False)

model = dict(
    type='MoEDetector',
    detector_type='FasterRCNN',  # the base's model keys stay flat beside it
    roi_head=dict(bbox_head=dict(
        _delete_=True, type='Shared4Conv1FCBBoxHead', in_channels=256,
        fc_out_channels=1024, roi_feat_size=7, num_classes=80,
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.],
                        target_stds=[0.1, 0.1, 0.2, 0.2]),
        reg_class_agnostic=False,
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0))),
    moe_layers=[
        dict(paths=['roi_head.bbox_head.shared_convs.2.conv',
                    'roi_head.bbox_head.shared_convs.3.conv'],
             num_experts=4, top_k=2, impl='dispatch', balance_cfg=dict(importance=0.5))
    ])

# tools/test.py --tta: DetTTAModel's merge, keeping each detection's level, gate
# weights and view (what ExpertSizeStatsHook needs)
tta_model = dict(type='MoEDetTTAModel',
                 tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
