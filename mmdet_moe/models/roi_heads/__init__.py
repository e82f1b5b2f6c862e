from .expert_tagging import install_roi_head_tagging

__all__ = ['install_roi_head_tagging']
