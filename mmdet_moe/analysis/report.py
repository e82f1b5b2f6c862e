"""Render an ``expert_size_stats.json`` into a report folder.

``report.md`` (tables per MoE layer), CSV files, and PNG heatmaps (expert × size,
expert × FPN level). The folder is written aside and moved into place when
complete, so a failed run never leaves a partial report that looks finished.
"""
import csv
import json
import os.path as osp
import re
from typing import List, Optional, Tuple

import numpy as np

from ..atomic_output import atomic_directory
from .metrics import (dominant, layer_summary, normalise_columns, normalise_rows,
                      normalised_mutual_information, size_table)
from .schema import ReportError, validate_stats


def check_stats(stats: dict) -> None:
    """A readable statistics file (:func:`validate_stats`) with something to report."""
    validate_stats(stats)
    if not stats['layers']:
        raise ReportError('the statistics hold no MoE layer')
    if stats['num_images'] == 0:
        raise ReportError('the statistics were taken on an empty dataset (0 images)')


def safe_name(layer: str) -> str:
    return re.sub(r'[^A-Za-z0-9_.-]+', '_', layer)


def markdown_table(header: List[str], rows: List[list], digits: int = 3) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f'{v:.{digits}f}'
        return '–' if v is None else str(v).replace('|', '\\|')
    lines = ['| ' + ' | '.join(fmt(h) for h in header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(fmt(v) for v in row) + ' |' for row in rows]
    return '\n'.join(lines)


def write_csv(path: str, header: List[str], rows: List[list]) -> None:
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# beyond this many experts the Markdown groups experts by their dominant size and
# the heatmaps drop per-cell values (a row per expert would bury the answer); the
# CSVs keep every expert
MAX_EXPERTS_LISTED = 16


def _label_rows(ax, row_names, fontsize: int = 8) -> None:
    """Every row's label, or about 16 of them for many rows."""
    step = max(1, -(-len(row_names) // MAX_EXPERTS_LISTED))
    ticks = range(0, len(row_names), step)
    ax.set_yticks(ticks, [row_names[i] for i in ticks], fontsize=fontsize)


def by_dominant_size(table: np.ndarray) -> List[int]:
    """Expert order for heatmaps: grouped by dominant size, most specialised first
    (unused experts last)."""
    given_expert = normalise_rows(table)
    unused = table.shape[1]
    dom = [int(row.argmax()) if table[i].sum() > 0 else unused
           for i, row in enumerate(given_expert)]
    return sorted(range(len(table)), key=lambda i: (
        dom[i], -given_expert[i, dom[i]] if dom[i] < unused else 0.0))


def size_groups(table: np.ndarray, names, top: int = 5) -> Tuple[List[str], List[list]]:
    """One row per size: how many experts it dominates, their share of the gate mass,
    and the most specialised of them with P(size | expert)."""
    given_expert = normalise_rows(table)
    dom = dominant(table, names)
    total = max(float(table.sum()), 1e-12)
    rows = []
    for j, name in enumerate(names):
        members = [i for i, d in enumerate(dom) if d == name]
        ranked = sorted(members, key=lambda i: -given_expert[i, j])[:top]
        rows.append([name, len(members), float(table[members].sum()) / total,
                     ', '.join(f'expert {i} ({given_expert[i, j]:.2f})' for i in ranked)])
    if None in dom:
        rows.append(['(unused)', dom.count(None), 0.0, ''])
    header = ['dominant size', 'experts', 'share of the gate mass',
              f'most specialised (top {top}, P(size | expert))']
    return header, rows


def dominant_counts(dominants: list, names) -> str:
    """``small 80, medium 100, large 76``: experts per dominant size."""
    return ', '.join(f'{name} {dominants.count(name)}' for name in names)


def heatmap(path: str, table: np.ndarray, row_names, col_names, title: str,
            value_label: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    listed = len(row_names) <= MAX_EXPERTS_LISTED
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(col_names) if listed else 6.5,
                                    1.0 + 0.5 * len(row_names) if listed else 8.0))
    image = ax.imshow(table, cmap='viridis', vmin=0, vmax=max(float(table.max()), 1e-9),
                      aspect='auto', interpolation='nearest')
    ax.set_xticks(range(len(col_names)), col_names)
    _label_rows(ax, row_names)
    for (i, j), value in (np.ndenumerate(table) if listed else ()):
        ax.text(j, i, f'{value:.2f}', ha='center', va='center',
                color='white' if value < 0.6 * table.max() else 'black', fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=value_label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def heatmap_grid(path: str, tables: List[np.ndarray], titles: List[str], row_names,
                 col_names, title: str) -> None:
    """One heatmap per table (e.g. per FPN level) side by side, values in [0, 1]."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    listed = len(row_names) <= MAX_EXPERTS_LISTED
    fig, axes = plt.subplots(1, len(tables), squeeze=False, sharey=True,
                             figsize=(0.6 + 0.9 * len(col_names) * len(tables),
                                      1.2 + 0.5 * len(row_names) if listed else 8.0))
    for ax, table, sub in zip(axes[0], tables, titles, strict=True):
        ax.imshow(table, cmap='viridis', vmin=0, vmax=1, aspect='auto',
                  interpolation='nearest')
        ax.set_xticks(range(len(col_names)), col_names, fontsize=7)
        _label_rows(ax, row_names, fontsize=7)
        for (i, j), value in (np.ndenumerate(table) if listed else ()):
            ax.text(j, i, f'{value:.2f}', ha='center', va='center', fontsize=6,
                    color='white' if value < 0.6 else 'black')
        ax.set_title(sub, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _with_interval(value: Optional[float], bounds: Optional[list]) -> str:
    text = 'n/a' if value is None else f'{value:.4f}'
    return text + (f' [95 % CI {bounds[0]:.4f}, {bounds[1]:.4f}]' if bounds else '')


def relative_scale_line(summary: dict) -> str:
    """NMI(expert; relative scale | level) with its interval against its
    within-(image, level) baseline and what that says, or why it is absent."""
    if summary['nmi_rel_scale_given_level'] is None:
        return summary['rel_scale_verdict']
    value = _with_interval(summary['nmi_rel_scale_given_level'],
                           summary['nmi_rel_scale_interval'])
    baseline = _with_interval(summary['nmi_rel_scale_shuffled'],
                              summary['nmi_rel_scale_shuffled_interval'])
    return (f'NMI expert↔relative scale | FPN level {value}; shuffled within '
            f'(image, level) {baseline}: {summary["rel_scale_verdict"]}')


def specialisation_lines(summary: dict, sizes=('small', 'medium', 'large')) -> List[str]:
    """The plain and the level-conditioned NMI, each with its baseline and interval,
    the within-level scale measure against its within-(image, level) baseline,
    each expert's P(size | expert) with its interval, and which of the two NMIs
    carries the specialisation (for reports and printouts). The image view (no
    detection) has neither baseline nor level-conditioned NMI: its NMI stands alone."""
    if summary['view'] == 'image':
        lines = [f'NMI expert↔size, image view (per-image gates × ground-truth sizes): '
                 f'{summary["nmi"]:.4f}; no detection-view baseline (no detection above '
                 'score_thr)']
    else:
        nmi = _with_interval(summary['nmi'], summary['nmi_interval'])
        baseline = _with_interval(summary['nmi_shuffled'], summary['nmi_shuffled_interval'])
        lines = [f'NMI expert↔size {nmi}; shuffled baseline {baseline}']
    if summary['nmi_given_level'] is not None:
        lines.append(
            'NMI expert↔size | FPN level '
            f'{_with_interval(summary["nmi_given_level"], summary["nmi_given_level_interval"])}; '
            'shuffled within levels '
            f'{_with_interval(summary["nmi_given_level_shuffled"], summary["nmi_given_level_shuffled_interval"])}')
    if summary['view'] == 'detection':  # the measure is of detections only
        lines.append(relative_scale_line(summary))
    bounds = summary['p_size_given_expert_interval']
    if summary['num_experts'] > MAX_EXPERTS_LISTED:
        return lines + [f'{summary["num_experts"]} experts by dominant size: '
                        f'{dominant_counts(summary["dominant_size"], sizes)} (each '
                        "expert's P(size | expert) in the report's CSVs)",
                        f'verdict: {summary["verdict"]}']
    for i, row in enumerate(summary['p_size_given_expert']):
        lines.append(f'expert {i}: P(size | expert) ' + ', '.join(
            f'{size} {value:.3f}' + (f' [{bounds[i][j][0]:.3f}, {bounds[i][j][1]:.3f}]'
                                     if bounds else '')
            for j, (size, value) in enumerate(zip(sizes, row, strict=True))))
    return lines + [f'verdict: {summary["verdict"]}']


def _level_tables(name: str, layer: dict, experts: List[str], sizes: List[str],
                  out_dir: str, order: List[int]) -> List[str]:
    """P(size | expert, level) and P(expert | size, level): Markdown, CSV, one grid."""
    table = np.asarray(layer['detection_levels']['mass'], dtype=np.float64)
    levels = [f'P{3 + i}' for i in range(table.shape[2])]
    stem = safe_name(name)
    header = ['level', 'expert', *[f'P({s} | expert, level)' for s in sizes],
              *[f'P(expert | {s}, level)' for s in sizes]]
    rows = []
    for level, label in enumerate(levels):
        given_expert = normalise_rows(table[:, :, level])
        given_size = normalise_columns(table[:, :, level])
        rows += [[label, e, *map(float, given_expert[i]), *map(float, given_size[i])]
                 for i, e in enumerate(experts)]
    write_csv(osp.join(out_dir, f'{stem}_size_expert_given_level.csv'), header, rows)
    heatmap_grid(osp.join(out_dir, f'{stem}_size_given_expert_level.png'),
                 [normalise_rows(table[order, :, level]) for level in range(len(levels))],
                 levels, [experts[i] for i in order], sizes,
                 f'{name}: P(size | expert, FPN level)')
    listed = len(experts) <= MAX_EXPERTS_LISTED
    return ['Within each FPN level (the level-controlled view):', '',
            markdown_table(header, rows) if listed
            else f'`{stem}_size_expert_given_level.csv`', '',
            f'![{name} size given expert and level]({stem}_size_given_expert_level.png)', '']


def _relative_scale_table(name: str, measure: dict, experts: List[str],
                          out_dir: str) -> List[str]:
    """Per level: s_l, the quantile edges of log2(√(w·h) / s_l), and each expert's
    P(bin | expert, level); Markdown (up to MAX_EXPERTS_LISTED experts) and CSV."""
    mass = np.asarray(measure['mass'], dtype=np.float64)  # (N, bins, L)
    bins = measure['bins']
    header = ['level', 's_l (px)', 'edges log2(√(w·h) / s_l)', 'expert',
              *[f'P(bin {q + 1} | expert, level)' for q in range(bins)]]
    rows = []
    for level, (size, edges) in enumerate(zip(measure['reference_sizes'],
                                              measure['edges'], strict=True)):
        if edges is None:
            continue
        given_expert = normalise_rows(mass[:, :, level])
        shown = ', '.join(f'{e:.2f}' for e in edges)
        rows += [[f'P{3 + level}', size, shown, e, *map(float, given_expert[i])]
                 for i, e in enumerate(experts)]
    stem = safe_name(name)
    write_csv(osp.join(out_dir, f'{stem}_relative_scale.csv'), header, rows)
    return [f'Within-level scale ({bins} quantile bins of the relative scale per FPN '
            'level, bin 1 the smallest):', '',
            markdown_table(header, rows) if len(experts) <= MAX_EXPERTS_LISTED
            else f'`{stem}_relative_scale.csv`', '']


VIEW_LABELS = dict(detection='detection', image='image (no detection above threshold)')


def _layer_section(name: str, layer: dict, summary: dict, sizes: List[str],
                   classes: List[str], out_dir: str) -> List[str]:
    experts = [f'expert {i}' for i in range(layer['num_experts'])]
    listed = layer['num_experts'] <= MAX_EXPERTS_LISTED
    mass, view = size_table(layer)
    view = VIEW_LABELS[view]
    given_expert, given_size = normalise_rows(mass), normalise_columns(mass)
    stem = safe_name(name)
    counts = np.asarray(layer['detection']['count'])
    rows = [[e, *map(float, given_expert[i]), summary['dominant_size'][i],
             summary['over_represented_size'][i], int(counts[i].sum())]
            for i, e in enumerate(experts)]
    header = ['expert', *[f'P({s} | expert)' for s in sizes], 'dominant',
              'most over-represented', 'detections routed']
    write_csv(osp.join(out_dir, f'{stem}_size_given_expert.csv'), header, rows)
    rows2 = [[e, *map(float, given_size[i])] for i, e in enumerate(experts)]
    header2 = ['expert', *[f'P(expert | {s})' for s in sizes]]
    write_csv(osp.join(out_dir, f'{stem}_expert_given_size.csv'), header2, rows2)
    order = list(range(len(experts))) if listed else by_dominant_size(mass)
    heatmap(osp.join(out_dir, f'{stem}_expert_size.png'), given_expert[order],
            [experts[i] for i in order], sizes,
            f'{name}: P(size | expert), {view} view' + ('' if listed else
                                                         ', experts by dominant size'),
            'P(size | expert)')
    shuffled = layer.get('nmi_shuffled') or {}
    # the shuffled baseline is of detections: no match for the image view's NMI
    baseline = (f'; with the gate weights shuffled across detections: '
                f'{shuffled.get("mean", 0):.4f} ± {shuffled.get("std", 0):.4f} '
                f'({shuffled.get("permutations", 0)} permutations)'
                if summary['view'] == 'detection' else '')
    lines = [f'## {name}', '',
             f'- normalised mutual information I(expert; size) / H(size): '
             f'**{summary["nmi"]:.4f}** ({view} view){baseline}',
             *[f'- {line}' for line in specialisation_lines(summary, sizes)],
             f'- living experts (mean gate weight > 0.01): {summary["living_experts"]} of '
             f'{summary["num_experts"]}; importance CV: {summary["importance_cv"]:.3f}', '',
             *((markdown_table(header, rows), '', markdown_table(header2, rows2)) if listed
               else (markdown_table(*size_groups(mass, sizes)), '',
                     f'Every expert: `{stem}_size_given_expert.csv`, '
                     f'`{stem}_expert_given_size.csv`.')), '',
             f'![{name} expert × size]({stem}_expert_size.png)', '']
    if layer.get('detection_levels') and summary['view'] == 'detection':  # else all 0
        lines += _level_tables(name, layer, experts, sizes, out_dir, order)
    measure = layer.get('relative_scale') or {}
    if 'edges' in measure:
        lines += _relative_scale_table(name, measure, experts, out_dir)
    if layer.get('levels'):
        level_mass = np.asarray(layer['levels']['mass'])
        levels = [f'P{3 + i}' for i in range(level_mass.shape[1])]
        given_level = normalise_columns(level_mass)
        header3 = ['expert', *[f'P(expert | {lv})' for lv in levels]]
        rows3 = [[e, *map(float, given_level[i])] for i, e in enumerate(experts)]
        write_csv(osp.join(out_dir, f'{stem}_levels.csv'), header3, rows3)
        heatmap(osp.join(out_dir, f'{stem}_expert_level.png'), given_level[order],
                [experts[i] for i in order], levels,
                f'{name}: P(expert | FPN level)', 'P(expert | level)')
        lines += ['Routing per FPN level (gate rows of all images):', '',
                  markdown_table(header3, rows3) if listed else f'`{stem}_levels.csv`', '',
                  f'![{name} expert × level]({stem}_expert_level.png)', '']
    class_mass = np.asarray(layer['classes']['mass'])
    if classes and class_mass.sum() > 0:
        given_cls = normalise_rows(class_mass)
        header4 = ['expert', *[f'P({c} | expert)' for c in classes], 'dominant class']
        rows4 = [[e, *map(float, given_cls[i]), dom] for i, (e, dom) in
                 enumerate(zip(experts, dominant(class_mass, classes), strict=True))]
        write_csv(osp.join(out_dir, f'{stem}_classes.csv'), header4, rows4)
        lines += [f'Class view (NMI expert ↔ class: '
                  f'{normalised_mutual_information(class_mass):.4f}):', '',
                  markdown_table(header4, rows4) if listed else f'`{stem}_classes.csv`', '']
    return lines


# the columns of an active-compute row (``ActiveCompute.rows()`` of mmdet_moe.layers)
COMPUTE_LABELS = dict(layer='layer', kind='kind', N='N', k='k',
                      rows_per_image='gate rows / image', params_total='params total',
                      params_active='params active / row', flops_k='FLOPs / image at k',
                      flops_n='FLOPs / image at N')
COMPUTE_NOTE = (
    "FLOPs as mmengine's `get_model_complexity_info` counts them: one multiply-add is "
    'one flop; conv and linear biases, ReLU and the gates\' average pools are free. '
    'Per MoE layer, e = one expert on the gate rows of one image (an image, or an '
    '(image, FPN level) for a head shared over levels): at N every expert runs on '
    'every row, gate + N·e; at k as the layer runs: dispatch gate + k·e, fused '
    '(single-conv experts) gate + e + k kernels mixed per row, μMoE its own forward. '
    'Params active: one gate row\'s (k of N experts); the model row counts shared '
    'parameters once.')


def _si(value) -> str:
    """``1.234 G``: a count with an SI prefix (as mmengine prints complexity)."""
    for prefix, scale in (('T', 1e12), ('G', 1e9), ('M', 1e6), ('k', 1e3)):
        if abs(value) >= scale:
            return f'{value / scale:.3f} {prefix}'
    return f'{value:g}'


def active_compute_table(rows: List[dict]) -> Tuple[List[str], List[list]]:
    """Header and rows for Markdown: parameters and FLOPs with SI prefixes."""
    header = [COMPUTE_LABELS.get(key, key) for key in rows[0]]
    return header, [[_si(v) if key.startswith(('params', 'flops')) else v
                     for key, v in row.items()] for row in rows]


def _active_compute_lines(compute: Optional[dict], out_dir: str) -> List[str]:
    """The report's section: ``compute`` = ``dict(input_shape=(H, W), rows=[...])``,
    or None when no model was at hand; the raw numbers go to ``active_compute.csv``."""
    lines = ['## Active compute', '']
    if compute is None:
        return lines + ['Not measured: this report was made from a statistics file, '
                        'without the model (run with CONFIG CHECKPOINT).', '']
    rows = compute['rows']
    write_csv(osp.join(out_dir, 'active_compute.csv'), [COMPUTE_LABELS.get(k, k)
                                                         for k in rows[0]],
              [list(row.values()) for row in rows])
    height, width = compute['input_shape']
    return lines + [f'One forward (backbone to head outputs) of a {height}×{width} image. '
                    + COMPUTE_NOTE, '', markdown_table(*active_compute_table(rows)), '']


def _header(stats: dict, sizes: List[str]) -> str:
    scope = (f'val statistics after epoch {stats["epoch"]}' if stats['mode'] == 'val'
             else 'test statistics')
    matched = (f' matched to ground truth (IoU ≥ {stats["iou_thr"]})'
               if stats['match_gt'] else '')
    gt = ', '.join(f'{s} {n}' for s, n in zip(sizes, stats['gt_per_bucket'], strict=True))
    return (f'{scope}, {stats["num_images"]} images, {stats["num_detections"]} detections '
            f'with score ≥ {stats["score_thr"]}{matched}; ground-truth objects per size: {gt}.')


def render_report(stats: dict, out_dir: str,
                  forced_routing: Optional[List[dict]] = None,
                  active_compute: Optional[dict] = None) -> str:
    """Write the report folder for ``stats``; returns the path of ``report.md``.

    Args:
        forced_routing: optional rows ``dict(routing=..., AP=..., AP_S=..., ...)`` of
            evaluations (learned routing, each expert alone, k sweeps); also
            written to ``metrics.json``.
        active_compute: ``dict(input_shape=(H, W), rows=[...])`` with the rows of
            ``mmdet_moe.layers.ActiveCompute.rows()`` (parameters and FLOPs per
            image per MoE layer and of the model), also written to
            ``active_compute.csv``; None: the section says it was not measured.
    """
    check_stats(stats)
    sizes, classes = stats['size_buckets']['names'], stats.get('classes', [])
    with atomic_directory(out_dir) as tmp:
        lines = ['# Expert specialisation report', '', _header(stats, sizes),
                 '', 'COCO size buckets (areas in original pixels, both ends inclusive as in '
                 'pycocotools): small [0, 32²], medium [32², 96²], large [96², ∞).', '']
        summaries = {name: layer_summary(layer, sizes)
                     for name, layer in stats['layers'].items()}
        summary_rows = []
        for name, s in summaries.items():
            summary_rows.append([name, s['num_experts'], s['living_experts'],
                                 s['importance_cv'], s['nmi'], s['nmi_shuffled'],
                                 s['nmi_given_level'], s['nmi_given_level_shuffled'],
                                 s['nmi_rel_scale_given_level'], s['nmi_rel_scale_shuffled'],
                                 *[', '.join(str(d) for d in s[key])
                                   if s['num_experts'] <= MAX_EXPERTS_LISTED
                                   else dominant_counts(s[key], sizes)
                                   for key in ('dominant_size', 'over_represented_size')],
                                 s['verdict']])
        header = ['layer', 'experts', 'living', 'importance CV', 'NMI expert↔size',
                  'NMI shuffled', 'NMI | level', 'NMI | level shuffled',
                  'NMI rel. scale | level', 'NMI rel. scale | level shuffled in (image, level)',
                  'dominant size per expert', 'most over-represented size per expert',
                  'verdict']
        write_csv(osp.join(tmp, 'summary.csv'), header, summary_rows)
        lines += ['## Summary', '', markdown_table(header, summary_rows, digits=4), '']
        if forced_routing:
            keys = [k for k in forced_routing[0] if k != 'routing']
            rows = [[r['routing'], *[r[k] for k in keys]] for r in forced_routing]
            write_csv(osp.join(tmp, 'forced_routing.csv'), ['routing', *keys], rows)
            with open(osp.join(tmp, 'metrics.json'), 'w') as f:
                json.dump(forced_routing, f, indent=1)
            lines += ['## Forced routing (COCO bbox AP)', '',
                      markdown_table(['routing', *keys], rows), '']
        lines += _active_compute_lines(active_compute, tmp)
        for name, layer in stats['layers'].items():
            lines += _layer_section(name, layer, summaries[name], sizes, classes, tmp)
        with open(osp.join(tmp, 'report.md'), 'w') as f:
            f.write('\n'.join(lines))
    return osp.join(out_dir, 'report.md')
