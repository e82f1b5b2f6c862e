# Multilinear (CP μMoE) head: the 4th conv of both towers becomes a CP-factorised MoE
# with 256 experts and per-pixel entmax-1.5 gates, parameters matched to the dense
# conv (rank from rank_for_params). Built with the generic insertion (MoEDetector).
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_moe'], allow_failed_imports=False)

model = dict(
    type='MoEDetector',
    detector_type='RetinaNet',  # the base's model keys stay flat beside it
    moe_layers=[
        dict(paths=['bbox_head.cls_convs.3.conv', 'bbox_head.reg_convs.3.conv'],
             type='CPMuMoEConv2d', num_experts=256, gate_mode='pixel',
             gate_act='entmax15', norm='bn')
    ])

# tools/test.py --tta: DetTTAModel's merge, keeping each detection's level, gate
# weights and view (what ExpertSizeStatsHook needs)
tta_model = dict(type='MoEDetTTAModel',
                 tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
