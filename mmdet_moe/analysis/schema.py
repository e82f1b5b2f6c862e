"""The ``expert_size_stats.json`` format: its name, the versions this package reads,
and :func:`validate_stats`, which names the first defect of a statistics dict by its
JSON path (e.g. ``layers["bbox_head.cls_moe"].detection.mass[2][1] = NaN``) and says
what would be right."""
import json
import math
from numbers import Integral, Real
from typing import Any, Optional, Sequence, Tuple

SCHEMA = 'mmdet_moe/expert_size_stats'
# 2: per-layer detection_levels, nmi_given_level_shuffled, intervals; top-level
# metrics. 3: per-layer relative_scale (the within-level scale measure). Version 1
# and 2 files are still read (without the level-controlled view, the measure).
SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
NUM_SIZE_BUCKETS = 3

# one axis of a table: (its length, None where the first row fixes it; what its
# entries are; why that length)
Axis = Tuple[Optional[int], str, str]


class ReportError(ValueError):
    """The input cannot make a report (the message says why)."""


class StatsFormatError(ReportError):
    """A statistics dict is not a readable ``expert_size_stats.json``."""


def _show(value: Any) -> str:
    """``value`` as the file spells it (NaN, Infinity, null, "text"), shortened."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= 60 else text[:57] + '...'


def _key(where: str, key: str) -> str:
    return f'{where}.{key}' if where else key


def _require(mapping: dict, key: str, where: str, what: str) -> Any:
    if key not in mapping:
        raise StatsFormatError(f'{where or "the file"} has no {key!r} (required: {what})')
    return mapping[key]


def _object(value: Any, where: str, what: str) -> dict:
    if not isinstance(value, dict):
        raise StatsFormatError(f'{where} = {_show(value)}: expected an object {what}')
    return value


def _integer(value: Any, where: str, minimum: int = 0) -> int:
    # bool is an Integral; a JSON true is no count
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise StatsFormatError(f'{where} = {_show(value)}: expected an integer >= {minimum}')
    return value


def _non_negative(value: Any, where: str, what: str) -> None:
    if (isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value)
            or value < 0):
        raise StatsFormatError(f'{where} = {_show(value)}: expected a finite number >= 0 '
                               f'({what})')


def _table(value: Any, where: str, axes: Sequence[Axis], what: str) -> None:
    """A nested list of the lengths ``axes`` give, holding finite numbers >= 0."""
    fixed: dict = {}  # axis -> (length, path) of its first row, for free axes

    def walk(item: Any, path: str, depth: int) -> None:
        if depth == len(axes):
            _non_negative(item, path, what)
            return
        length, entries, why = axes[depth]
        if length is None and depth in fixed:
            length, why = fixed[depth][0], f'as in {fixed[depth][1]}'
        if not isinstance(item, list):
            count = '' if length is None else f'{length} '
            raise StatsFormatError(f'{path} = {_show(item)}: expected a list of '
                                   f'{count}{entries} ({why})')
        if length is None:
            if not item:
                raise StatsFormatError(f'{path} is empty: expected at least one of the '
                                       f'{entries} ({why})')
            fixed[depth] = (len(item), path)
        elif len(item) != length:
            raise StatsFormatError(f'{path} has {len(item)} {entries}, expected {length} '
                                   f'({why})')
        for i, sub in enumerate(item):
            walk(sub, f'{path}[{i}]', depth + 1)
    walk(value, where, 0)


def _bounds(value: Any, where: str) -> None:
    """A 95 % interval: [lower, upper], finite, lower <= upper."""
    _table(value, where, [(2, 'bounds', '[lower, upper]')], 'an interval bound')
    if value[0] > value[1]:
        raise StatsFormatError(f'{where} = {_show(value)}: expected lower <= upper')


def _baseline(value: Any, where: str) -> None:
    """A shuffled baseline: mean, std, interval and permutations, each where present."""
    if value is None:
        return
    _object(value, where, 'with the shuffled NMIs\' "mean", "std", "interval"')
    for key in ('mean', 'std'):
        if key in value:
            _non_negative(value[key], _key(where, key), f'{key} of the shuffled NMIs')
    if 'interval' in value:
        _bounds(value['interval'], _key(where, 'interval'))
    if 'permutations' in value:
        _integer(value['permutations'], _key(where, 'permutations'))


def _intervals(value: Any, where: str, experts: Axis, sizes: Axis) -> None:
    """Bootstrap intervals of the NMIs and of each expert's P(size | expert)."""
    if value is None:
        return
    _object(value, where, 'with bootstrap intervals "nmi", "p_size_given_expert"')
    for key in ('nmi', 'nmi_given_level'):
        if value.get(key) is not None:
            _bounds(value[key], _key(where, key))
    if value.get('p_size_given_expert') is not None:
        path = _key(where, 'p_size_given_expert')
        _table(value['p_size_given_expert'], path,
               [experts, sizes, (2, 'bounds', '[lower, upper]')], 'an interval bound')
        for i, row in enumerate(value['p_size_given_expert']):
            for j, pair in enumerate(row):
                _bounds(pair, f'{path}[{i}][{j}]')


def _finite(value: Any, where: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise StatsFormatError(f'{where} = {_show(value)}: expected a finite number ({what})')
    return value


def _relative_scale(value: Any, where: str, experts: Axis) -> None:
    """The within-level scale measure, or ``{"absent": reason}``."""
    if value is None:
        return
    _object(value, where, 'with the within-level scale measure ("bins", "edges", '
            '"mass", ...) or {"absent": "why"}')
    if 'absent' in value:
        if not isinstance(value['absent'], str):
            raise StatsFormatError(f'{_key(where, "absent")} = {_show(value["absent"])}: '
                                   'expected a string saying why the measure is absent')
        return
    bins = _integer(_require(value, 'bins', where, 'the quantile bins per level, an '
                             'integer >= 2'), _key(where, 'bins'), 2)
    sizes = _require(value, 'reference_sizes', where, 'the reference size s_l of each '
                     'FPN level')
    path = _key(where, 'reference_sizes')
    if not isinstance(sizes, list) or not sizes:
        raise StatsFormatError(f'{path} = {_show(sizes)}: expected a list of the reference '
                               'sizes (pixels > 0), one per FPN level')
    for i, size in enumerate(sizes):
        if _finite(size, f'{path}[{i}]', 'a reference size in pixels') <= 0:
            raise StatsFormatError(f'{path}[{i}] = {_show(size)}: expected a reference size '
                                   '> 0 (pixels)')
    levels: Axis = (len(sizes), 'FPN levels', 'one per entry of reference_sizes')
    edges = _require(value, 'edges', where, 'the quantile edges of each level')
    path = _key(where, 'edges')
    if not isinstance(edges, list) or len(edges) != len(sizes):
        raise StatsFormatError(f'{path} = {_show(edges)}: expected a list of {len(sizes)} '
                               'levels\' edges (one per entry of reference_sizes, null for '
                               'a level without detections)')
    for i, level_edges in enumerate(edges):
        at = f'{path}[{i}]'
        if level_edges is None:
            continue
        if not isinstance(level_edges, list) or len(level_edges) != bins + 1:
            raise StatsFormatError(f'{at} = {_show(level_edges)}: expected {bins + 1} '
                                   f'quantile edges (bins + 1) or null')
        for j, edge in enumerate(level_edges):
            _finite(edge, f'{at}[{j}]', 'a relative scale, log2')
        if any(b < a for a, b in zip(level_edges, level_edges[1:])):
            raise StatsFormatError(f'{at} = {_show(level_edges)}: expected non-decreasing '
                                   'edges')
    _table(_require(value, 'mass', where, 'the expert × bin × level gate mass'),
           _key(where, 'mass'), [experts, (bins, 'bins', 'bins'), levels], 'gate mass')
    nmi = _finite(_require(value, 'nmi_given_level', where, 'NMI(expert; relative scale '
                           '| level)'), _key(where, 'nmi_given_level'), 'an NMI')
    if not 0 <= nmi <= 1 + 1e-9:
        raise StatsFormatError(f'{_key(where, "nmi_given_level")} = {_show(nmi)}: expected '
                               'an NMI in [0, 1]')
    if value.get('interval') is not None:
        _bounds(value['interval'], _key(where, 'interval'))
    _baseline(_require(value, 'shuffled_within_image_level', where, 'the baseline '
                       'shuffled within each (image, level)'),
              _key(where, 'shuffled_within_image_level'))
    _baseline(value.get('shuffled_within_level'), _key(where, 'shuffled_within_level'))


def _layer(layer: Any, where: str, sizes: Axis, classes: Axis) -> None:
    _object(layer, where, 'with one MoE layer\'s tables ("num_experts", "detection", ...)')
    num_experts = _integer(_require(layer, 'num_experts', where, 'the number of experts, '
                                    'an integer >= 1'), _key(where, 'num_experts'), 1)
    experts: Axis = (num_experts, 'expert rows', 'num_experts')
    levels: Axis = (None, 'FPN levels', 'one per FPN level')
    tables = [  # (key, what it holds, required, keys the report reads, axes)
        ('detection', 'detection-view tables {"mass", "count"}: num_experts × 3', True,
         ['mass', 'count'], [experts, sizes]),
        ('image', 'image-view table {"mass"}: num_experts × 3', True,
         ['mass'], [experts, sizes]),
        ('classes', 'class-view table {"mass"}: num_experts × len(classes)', True,
         ['mass'], [experts, classes]),
        ('levels', 'per-level routing {"mass"}: num_experts × FPN levels', False,
         ['mass'], [experts, levels]),
        ('detection_levels', 'expert × size × level table {"mass"}', False,
         ['mass'], [experts, sizes, levels])]
    for key, what, required, read, axes in tables:
        table = _require(layer, key, where, what) if required else layer.get(key)
        if table is None:
            continue  # an optional view the run did not record
        path = _key(where, key)
        _object(table, path, f'with the {what}')
        for name in read:
            _require(table, name, path, what)
        for name in ('mass', 'count'):  # a count written but not read is checked alike
            if name in table:
                _table(table[name], _key(path, name), axes,
                       'a count' if name == 'count' else 'gate mass')
        if 'rows' in table:
            _integer(table['rows'], _key(path, 'rows'))
    _table(_require(layer, 'importance', where, 'each expert\'s summed gate weight'),
           _key(where, 'importance'), [experts], 'summed gate weight')
    _integer(_require(layer, 'rows', where, 'the number of gate rows, an integer >= 0'),
             _key(where, 'rows'))
    for key in ('nmi_shuffled', 'nmi_given_level_shuffled'):
        _baseline(layer.get(key), _key(where, key))
    _intervals(layer.get('intervals'), _key(where, 'intervals'), experts, sizes)
    _relative_scale(layer.get('relative_scale'), _key(where, 'relative_scale'), experts)


def validate_stats(stats: Any) -> None:
    """Raise :class:`StatsFormatError` naming the first defect of ``stats`` (an
    ``expert_size_stats.json`` as loaded) by its JSON path, with what would be right:
    schema name and version, the keys the report reads, and table shapes (num_experts
    rows; 3 size buckets) of finite numbers >= 0. Views a run may not have recorded
    (``levels``, ``detection_levels``, baselines, ``intervals``; all absent before
    schema version 2; ``relative_scale``, absent before version 3) are checked where
    present. Does not modify ``stats``."""
    if not isinstance(stats, dict):
        kind = {list: 'list', str: 'string'}.get(type(stats), type(stats).__name__)
        raise StatsFormatError(f'the file holds a JSON {kind}, expected an object with '
                               f'"schema": {SCHEMA!r} and the statistics')
    if stats.get('schema') != SCHEMA:
        raise StatsFormatError(f'not an expert size statistics file (schema '
                               f'{stats.get("schema")!r}, expected {SCHEMA!r})')
    version = stats.get('version')
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise StatsFormatError(
            f'statistics schema version {version!r} is not supported; this mmdet_moe '
            f'reads versions {", ".join(map(str, READABLE_VERSIONS[:-1]))} and '
            f'{READABLE_VERSIONS[-1]}')
    mode = _require(stats, 'mode', '', '"val" or "test"')
    if mode not in ('val', 'test'):
        raise StatsFormatError(f'mode = {_show(mode)}: expected "val" or "test"')
    if mode == 'val':
        _integer(_require(stats, 'epoch', '', 'the epoch of val statistics'), 'epoch')
    for key, what in (('num_images', 'the number of images evaluated'),
                      ('num_detections', 'the number of detections counted')):
        _integer(_require(stats, key, '', f'{what}, an integer >= 0'), key)
    score_thr = _require(stats, 'score_thr', '', 'the detection score threshold')
    if (isinstance(score_thr, bool) or not isinstance(score_thr, Real)
            or not 0 <= score_thr <= 1):
        raise StatsFormatError(f'score_thr = {_show(score_thr)}: expected a number in [0, 1]')
    match_gt = _require(stats, 'match_gt', '', 'true or false')
    if not isinstance(match_gt, bool):
        raise StatsFormatError(f'match_gt = {_show(match_gt)}: expected true or false')
    if match_gt:
        iou_thr = _require(stats, 'iou_thr', '', 'the IoU threshold of match_gt')
        if isinstance(iou_thr, bool) or not isinstance(iou_thr, Real) or not 0 < iou_thr <= 1:
            raise StatsFormatError(f'iou_thr = {_show(iou_thr)}: expected a number in (0, 1]')
    buckets = _object(_require(stats, 'size_buckets', '', 'the size buckets {"names"}'),
                      'size_buckets', 'with the size buckets\' "names"')
    names = _require(buckets, 'names', 'size_buckets', 'the names of the size buckets')
    if (not isinstance(names, list) or len(names) != NUM_SIZE_BUCKETS
            or not all(isinstance(n, str) for n in names)):
        raise StatsFormatError(f'size_buckets.names = {_show(names)}: expected the names '
                               f'of the {NUM_SIZE_BUCKETS} size buckets, e.g. '
                               '["small", "medium", "large"]')
    sizes: Axis = (NUM_SIZE_BUCKETS, 'size buckets',
                   f'size_buckets.names: {", ".join(names)}')
    class_names = stats.get('classes', [])
    if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
        raise StatsFormatError(f'classes = {_show(class_names)}: expected a list of class '
                               'names')
    classes: Axis = (len(class_names), 'classes', 'one per name in "classes"')
    _table(_require(stats, 'gt_per_bucket', '', 'ground-truth objects per size bucket'),
           'gt_per_bucket', [sizes], 'ground-truth objects')
    layers = _object(_require(stats, 'layers', '', 'the MoE layers\' tables'), 'layers',
                     '{layer name: its tables}')
    for name, layer in layers.items():
        _layer(layer, f'layers[{json.dumps(name)}]', sizes, classes)
