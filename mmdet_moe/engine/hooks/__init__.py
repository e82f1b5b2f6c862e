from .expert_size_stats_hook import SCHEMA, SCHEMA_VERSION, ExpertSizeStatsHook, write_stats
from .expert_utilisation_hook import ExpertUtilisationHook
from .memory_format import MemoryFormatHook

__all__ = ['ExpertSizeStatsHook', 'ExpertUtilisationHook', 'MemoryFormatHook', 'SCHEMA',
           'SCHEMA_VERSION', 'write_stats']
