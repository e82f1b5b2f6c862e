from .moe_fpn import MoEFPN

__all__ = ['MoEFPN']
