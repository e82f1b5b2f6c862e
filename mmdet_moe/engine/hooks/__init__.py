from .expert_size_stats_hook import SCHEMA, SCHEMA_VERSION, ExpertSizeStatsHook, write_stats
from .memory_format import MemoryFormatHook
from .expert_utilisation_hook import ExpertUtilisationHook

__all__ = ['MemoryFormatHook', 'ExpertSizeStatsHook', 'ExpertUtilisationHook', 'SCHEMA',
           'SCHEMA_VERSION', 'write_stats']
