# Dense baseline for the toy MoE configs: same data, model size and schedule.
_base_ = './_base_/retinanet_r18_fpn_toy.py'
