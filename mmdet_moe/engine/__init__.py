"""Runner hooks: gate statistics during val/test, expert utilisation during training."""
from .hooks import ExpertSizeStatsHook, ExpertUtilisationHook

__all__ = ['ExpertSizeStatsHook', 'ExpertUtilisationHook']
