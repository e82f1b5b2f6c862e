from .expert_tagging import tagged_predict, tags_detections
from .moe_retina_head import MoERetinaHead, TowerExpert

__all__ = ['MoERetinaHead', 'TowerExpert', 'tagged_predict', 'tags_detections']
