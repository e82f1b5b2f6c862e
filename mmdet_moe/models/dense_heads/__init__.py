from .expert_tagging import install_dense_head_tagging, tags_detections
from .moe_retina_head import MoERetinaHead

__all__ = ['MoERetinaHead', 'install_dense_head_tagging', 'tags_detections']
