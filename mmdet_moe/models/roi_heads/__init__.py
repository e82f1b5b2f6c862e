from .expert_tagging import (TAGGED_ROI_HEADS, roi_head_tags_detections,
                             tagged_predict_bbox)

__all__ = ['TAGGED_ROI_HEADS', 'roi_head_tags_detections', 'tagged_predict_bbox']
