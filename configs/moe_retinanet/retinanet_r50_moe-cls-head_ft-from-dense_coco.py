# The paper's protocol: start from a trained dense RetinaNet, copy its classification
# branch into every expert (upcycling, with a little noise to break symmetry), freeze
# everything else and train only the MoE parts (Adam, lr 1e-5, grad clip 0.1).
_base_ = './retinanet_r50_moe-cls-head_1x_coco.py'

model = dict(
    train_only_moe=True,
    backbone=dict(init_cfg=None),
    bbox_head=dict(upcycle_noise_std=0.01))
load_from = ('https://download.openmmlab.com/mmdetection/v2.0/retinanet/'
             'retinanet_r50_fpn_1x_coco/retinanet_r50_fpn_1x_coco_20200130-c2398f9e.pth')

max_epochs = 16
train_cfg = dict(max_epochs=max_epochs)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='Adam', lr=1e-5),
    clip_grad=dict(max_norm=0.1, norm_type=2))
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=True, begin=0, end=max_epochs)]
