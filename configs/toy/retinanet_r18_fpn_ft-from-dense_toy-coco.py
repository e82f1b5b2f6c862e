# The paper's protocol on the toy (tools/demo_paper.py, `make demo-paper`): start from
# the trained dense toy RetinaNet, freeze it and fine-tune only its classification
# branch. This file is the control, the DENSE head fine-tuned (what fine-tuning alone
# gives), and the base of the MoE arms (moe-head-{soft,hard,equal}_ft-from-dense),
# which train their MoE branch instead, frozen alike: requires_grad is off outside the
# trained modules (train_only here, train_only_moe there) and the backbone's BatchNorm
# statistics stay fixed (norm_eval; the FPN has no norm layer, the head's GroupNorm no
# running statistics).
# Optimiser: the paper's (Adam, grad clip 0.1, a step schedule) scaled to the toy. The
# paper fine-tunes at lr 1e-5 for ~16 COCO epochs; `make demo-paper` fine-tunes 27
# times (9 arms × 3 seeds), so an arm gets 150 iterations of batch 8 (0.4 of an epoch;
# measured: about 60 s an arm with its evaluation, 27 min for all on 2 cores). At lr
# 1e-5 fresh experts would hardly leave their initialisation in 150 Adam steps
# (≤ 1e-5 per weight and step); hence lr 3e-4 (a tenth of the dense training's peak)
# for 100 iterations, then 3e-5. Measured: the control gains 0.002 AP on the dense
# model (0.424), copied experts keep it, fresh ones reach 0.26-0.29 (README, Results).
_base_ = './retinanet_r18_fpn_4e_toy-coco.py'

model = dict(
    type='MoERetinaNet',
    train_only=['bbox_head.cls_convs', 'bbox_head.retina_cls'],
    backbone=dict(norm_eval=True))
# the dense toy RetinaNet `make demo-compare` trains; tools/demo_paper.py sets its own
load_from = 'work_dirs/demo/dense_seed0/epoch_4.pth'

max_iters = 150
train_dataloader = dict(sampler=dict(type='InfiniteSampler', shuffle=True))
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters,
                 val_interval=max_iters)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='Adam', lr=3e-4),
    clip_grad=dict(max_norm=0.1, norm_type=2))
param_scheduler = [
    dict(type='MultiStepLR', by_epoch=False, milestones=[100], gamma=0.1)
]
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(by_epoch=False, interval=max_iters, max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
