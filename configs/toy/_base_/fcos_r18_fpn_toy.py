# FCOS sized as the toy RetinaNet, whose data, backbone (quarter-width ResNet-18), FPN
# (64 channels), schedule and optimizer it inherits: only the head is FCOS's, with 2
# GroupNorm convs per tower as the toy RetinaNet head. FCOS's "tricks" (centre
# sampling, normalised box targets, centre-ness on the regression branch, GIoU) help
# it train from scratch in few iterations; the regression ranges are halved for the
# 256-px toy images (the toy RetinaNet halves its anchors).
_base_ = './retinanet_r18_fpn_toy.py'

model = dict(
    type='FCOS',
    neck=dict(add_extra_convs='on_output', relu_before_extra_convs=True),  # as FCOS
    bbox_head=dict(
        _delete_=True,
        type='FCOSHead',
        num_classes=5,
        in_channels=64,
        feat_channels=64,
        stacked_convs=2,
        strides=[8, 16, 32, 64, 128],
        regress_ranges=((-1, 32), (32, 64), (64, 128), (128, 256), (256, 1e8)),
        norm_cfg=dict(type='GN', num_groups=16, requires_grad=True),
        center_sampling=True,
        center_sample_radius=1.5,
        norm_on_bbox=True,
        centerness_on_reg=True,
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
                      loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=1.0),
        loss_centerness=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0)),
    train_cfg=None)  # FCOS assigns its points itself; test_cfg is RetinaNet's (= FCOS's)
