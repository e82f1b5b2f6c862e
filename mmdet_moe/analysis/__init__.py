"""Specialisation metrics and report rendering (numpy / matplotlib; no model code)."""
from .metrics import (bootstrap, conditional_nmi, dominant, entropy,
                      expert_size_level_table, importance_cv, interval, layer_summary,
                      level_shuffled_nmi, living_experts, mean_gate_weights,
                      most_over_represented,
                      normalise_columns, normalise_rows, normalised_mutual_information,
                      shuffled_nmi, significant, size_table, specialisation_intervals,
                      verdict)
from .report import check_stats, render_report, specialisation_lines
from .schema import (SCHEMA, SCHEMA_VERSION, ReportError, StatsFormatError,
                     validate_stats)
from .size_buckets import AREA_RANGES, BUCKET_NAMES, bucket_membership

__all__ = [
    'AREA_RANGES', 'BUCKET_NAMES', 'ReportError', 'SCHEMA', 'SCHEMA_VERSION',
    'StatsFormatError', 'bootstrap', 'bucket_membership', 'check_stats', 'conditional_nmi',
    'dominant', 'entropy', 'expert_size_level_table', 'importance_cv', 'interval',
    'layer_summary', 'level_shuffled_nmi', 'living_experts', 'mean_gate_weights',
    'most_over_represented',
    'normalise_columns', 'normalise_rows', 'normalised_mutual_information', 'render_report',
    'shuffled_nmi', 'significant', 'size_table', 'specialisation_intervals',
    'specialisation_lines', 'validate_stats', 'verdict'
]
