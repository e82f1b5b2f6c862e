from .expert_tagging import tagged_predict_bbox

__all__ = ['tagged_predict_bbox']
