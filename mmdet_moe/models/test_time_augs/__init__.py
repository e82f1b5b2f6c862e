from .moe_det_tta import MoEDetTTAModel

__all__ = ['MoEDetTTAModel']
