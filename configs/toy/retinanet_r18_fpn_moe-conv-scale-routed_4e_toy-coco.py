# The positive control of the within-level scale measure: the per-location single-conv
# MoE of retinanet_r18_fpn_moe-conv-pixel_4e_toy-coco.py, its gate also taught to send
# each positive anchor's location to the expert of its ground-truth box's relative
# scale log2(√(w·h) / s_l) (bins 0.25, 0.5, 0.75 of the anchor octave; s_l = 2 × the
# level's stride, the toy's smallest anchor). A measure that misses this routing
# cannot find subtler within-level specialisation.
_base_ = './retinanet_r18_fpn_moe-conv-pixel_4e_toy-coco.py'

model = dict(bbox_head=dict(routing_supervision=dict(weight=1.0)))
