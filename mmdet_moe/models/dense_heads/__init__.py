from .expert_tagging import install_dense_head_tagging, tags_detections
from .moe_retina_head import MoERetinaHead, TowerExpert

__all__ = ['MoERetinaHead', 'TowerExpert', 'install_dense_head_tagging', 'tags_detections']
