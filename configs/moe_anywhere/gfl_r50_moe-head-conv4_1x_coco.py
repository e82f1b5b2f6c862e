# MoE anywhere: GFL with the 4th conv of both head towers as MoEConv2d experts (4
# experts, k=2 per (image, FPN level), importance loss 0.5), over mmdet's own config.
_base_ = 'mmdet::gfl/gfl_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_moe'], allow_failed_imports=False)

model = dict(
    type='MoEDetector',
    detector_type='GFL',  # the base's model keys stay flat beside it
    moe_layers=[
        dict(paths=['bbox_head.cls_convs.3.conv', 'bbox_head.reg_convs.3.conv'],
             num_experts=4, top_k=2, balance_cfg=dict(importance=0.5))
    ])

# tools/test.py --tta: DetTTAModel's merge, keeping each detection's level, gate
# weights and view (what ExpertSizeStatsHook needs)
tta_model = dict(type='MoEDetTTAModel',
                 tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
