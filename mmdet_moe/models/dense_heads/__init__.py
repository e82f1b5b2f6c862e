from .expert_tagging import tagged_predict, tags_detections, untagged_reason
from .moe_retina_head import MoERetinaHead

__all__ = ['MoERetinaHead', 'tagged_predict', 'tags_detections', 'untagged_reason']
