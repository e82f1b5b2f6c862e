from .expert_tagging import ExpertTaggingMixin
from .moe_retina_head import MoERetinaHead, TowerExpert

__all__ = ['ExpertTaggingMixin', 'MoERetinaHead', 'TowerExpert']
