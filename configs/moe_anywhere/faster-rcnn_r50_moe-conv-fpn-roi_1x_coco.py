# MoE anywhere through mmcv's conv_cfg: the stock Faster R-CNN (its own class) whose FPN
# convs and RoI-head convs are MoEConv2d layers, one config line each. The balance
# losses appear in the loss dict as loss_moe_importance.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_moe'], allow_failed_imports=False)

moe_conv = dict(type='MoEConv2d', num_experts=4, top_k=2, balance_cfg=dict(importance=0.5))
# RoIs route one by one: a fused kernel per RoI would cost N_rois × C² × 9 weights,
# dispatching each RoI to its k experts costs k dense convs
moe_conv_per_roi = dict(moe_conv, impl='dispatch')
model = dict(
    neck=dict(conv_cfg=moe_conv),
    roi_head=dict(bbox_head=dict(
        _delete_=True, type='Shared4Conv1FCBBoxHead', conv_cfg=moe_conv_per_roi,
        in_channels=256,
        fc_out_channels=1024, roi_feat_size=7, num_classes=80,
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.],
                        target_stds=[0.1, 0.1, 0.2, 0.2]),
        reg_class_agnostic=False,
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0))))

# tools/test.py --tta: DetTTAModel's merge, keeping each detection's level, gate
# weights and view (what ExpertSizeStatsHook needs)
tta_model = dict(type='MoEDetTTAModel',
                 tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
