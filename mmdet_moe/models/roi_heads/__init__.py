from .expert_tagging import (TAGGED_ROI_HEADS, roi_head_tags_detections,
                             tagged_predict_bbox)
from .query_tagging import QUERY_ROI_HEADS, tagged_sparse_predict_bbox
from .trident_tagging import tagged_merge_trident_bboxes

__all__ = ['TAGGED_ROI_HEADS', 'QUERY_ROI_HEADS', 'roi_head_tags_detections',
           'tagged_predict_bbox', 'tagged_sparse_predict_bbox',
           'tagged_merge_trident_bboxes']
