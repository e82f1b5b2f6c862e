"""mmdet-moe: sparsely-gated Mixture-of-Experts layers for MMDetection 3.x."""
from .version import __version__

__all__ = ['__version__']
