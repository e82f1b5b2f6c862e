"""Specialisation metrics and report rendering (numpy / matplotlib; no model code)."""
from .metrics import (dominant, entropy, importance_cv, layer_summary, living_experts,
                      most_over_represented, normalise_columns, normalise_rows,
                      normalised_mutual_information, shuffled_nmi, size_table)
from .report import SCHEMA, SCHEMA_VERSION, ReportError, check_stats, render_report
from .size_buckets import AREA_RANGES, BUCKET_NAMES, bucket_membership

__all__ = [
    'AREA_RANGES', 'BUCKET_NAMES', 'ReportError', 'SCHEMA', 'SCHEMA_VERSION',
    'bucket_membership', 'check_stats', 'dominant', 'entropy', 'importance_cv',
    'layer_summary', 'living_experts', 'most_over_represented', 'normalise_columns',
    'normalise_rows', 'normalised_mutual_information', 'render_report', 'shuffled_nmi',
    'size_table'
]
