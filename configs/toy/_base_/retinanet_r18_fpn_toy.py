# RetinaNet sized to train from scratch on 2 CPU cores in minutes: a quarter-width
# ResNet-18 (16 base channels, no pretrained weights), a 64-channel FPN, a head of 1
# conv per branch (RetinaNet's has 4) with GroupNorm (as FCOS/ATSS heads: it lets a
# head trained from scratch converge in few iterations). Smaller anchors (base 16 px
# at P3) suit the toy sizes. 4 epochs over the 3,000 toy training images: at 3 epochs
# the detector is far from converged and its AP swings across seeds (docs/demo.md,
# Seeds); a second head conv or a wider backbone (24 or 32 base channels) costs more time
# than it gives AP.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py', './toy_coco_detection.py',
    'mmdet::_base_/default_runtime.py'
]
custom_imports = dict(imports=['mmdet_moe'], allow_failed_imports=False)

model = dict(
    backbone=dict(depth=18, base_channels=16, frozen_stages=-1, norm_eval=False,
                  init_cfg=None),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=64),
    bbox_head=dict(
        num_classes=5,
        in_channels=64,
        feat_channels=64,
        stacked_convs=1,
        norm_cfg=dict(type='GN', num_groups=16, requires_grad=True),
        anchor_generator=dict(octave_base_scale=2)))

max_epochs = 4
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=max_epochs)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=3e-3, weight_decay=1e-4),
    clip_grad=dict(max_norm=10, norm_type=2))
# linear warm-up over 100 iterations, then cosine decay to 1 % per iteration
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='CosineAnnealingLR', T_max=max_epochs, eta_min_ratio=0.01, by_epoch=True,
         begin=0, end=max_epochs, convert_to_iter_based=True)
]
# channels-last: the convs run on NHWC feature maps, about a sixth faster per iteration
# on 2 CPU cores (docs/demo.md); the same model, rounded differently
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(type='CheckpointHook', interval=max_epochs, max_keep_ckpts=1),
    memory_format=dict(type='MemoryFormatHook', memory_format='channels_last'))
# A fixed seed (model init, gate noise, sampler, augmentation): two runs on one machine
# give the same numbers. `--cfg-options randomness.seed=N` changes it; on a GPU,
# `randomness.deterministic=True` also fixes cuDNN's algorithm choice (slower).
randomness = dict(seed=0, deterministic=False)

# tools/test.py --tta: the image and its horizontal flip at the test scale, merged as
# DetTTAModel does, keeping each detection's level, gate weights and view
tta_model = dict(type='MoEDetTTAModel',
                 tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='TestTimeAug',
         transforms=[[dict(type='Resize', scale=(256, 256), keep_ratio=True)],
                     [dict(type='RandomFlip', prob=1.), dict(type='RandomFlip', prob=0.)],
                     [dict(type='LoadAnnotations', with_bbox=True)],
                     [dict(type='PackDetInputs',
                           meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                                      'scale_factor', 'flip', 'flip_direction'))]])
]
