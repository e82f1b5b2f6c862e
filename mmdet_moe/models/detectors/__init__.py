from .moe_retinanet import MoERetinaNet

__all__ = ['MoERetinaNet']
