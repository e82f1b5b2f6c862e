r"""Specialisation metrics on expert × category tables (categories: sizes, classes, levels).

A table ``M`` (N experts × S categories) holds gate mass (or counts). With the joint
``p(e, s) = M / ΣM``:

- ``P(size | expert)``: rows of M normalised; ``P(expert | size)``: columns.
- dominant category per expert: argmax of its row.
- normalised mutual information ``NMI = I(E; S) / H(S)`` in [0, 1]: the fraction of
  the size entropy explained by the expert; 0 = no specialisation.
- the FPN-level confound: FPN assigns objects to levels by size and a head's gate
  sees the level, so experts that route by level look size-specialised. With a
  table (N experts × S sizes × L levels), the level-conditioned
  ``NMI(E; S | L) = Σ_l P(l)·I(E; S | L=l) / Σ_l P(l)·H(S | L=l)`` says how much the
  expert tells about size *within* a level (0: nothing beyond the level).
- uncertainty: bootstrap intervals over images (an image's detections stay
  together) and permutation baselines (gate weights shuffled across detections, or
  among the detections of one level only).
"""
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

EPS = 1e-12


def normalise_rows(table: np.ndarray) -> np.ndarray:
    """Rows (the last axis) scaled to sum to 1; all-zero rows stay 0."""
    table = np.asarray(table, dtype=np.float64)
    sums = table.sum(axis=-1, keepdims=True)
    return np.divide(table, sums, out=np.zeros_like(table), where=sums > 0)


def normalise_columns(table: np.ndarray) -> np.ndarray:
    return normalise_rows(np.asarray(table, dtype=np.float64).T).T


def entropy(p: np.ndarray) -> float:
    p = np.asarray(p, dtype=np.float64).ravel()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _entropies(p: np.ndarray, axis) -> np.ndarray:
    """``−Σ p log p`` over ``axis`` (0 log 0 = 0), for every index of the other axes."""
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=axis)


def conditional_nmis(tables: np.ndarray) -> np.ndarray:
    """:func:`conditional_nmi` of every (N, S, L) table of a (..., N, S, L) stack,
    at once (e.g. all bootstrap resamples)."""
    tables = np.asarray(tables, dtype=np.float64)
    mass = tables.sum(axis=(-3, -2))  # (..., L)
    level_mass = mass[..., None, None, :]
    joint = np.divide(tables, level_mass, out=np.zeros_like(tables), where=level_mass > 0)
    h_size = _entropies(joint.sum(axis=-3), -2)  # (..., L)
    mutual = np.maximum(h_size + _entropies(joint.sum(axis=-2), -2)
                        - _entropies(joint, (-3, -2)), 0)
    total = mass.sum(axis=-1, keepdims=True)
    share = np.divide(mass, total, out=np.zeros_like(mass), where=total > 0)  # P(l)
    numerator, denominator = (share * mutual).sum(-1), (share * h_size).sum(-1)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator),
                     where=denominator > EPS)


def normalised_mutual_information(table: np.ndarray) -> float:
    """``I(E; S) / H(S)`` of the joint distribution proportional to ``table``; 0 when
    the table is empty or S has no entropy."""
    return float(conditional_nmis(np.asarray(table, dtype=np.float64)[:, :, None]))


def conditional_nmi(table: np.ndarray) -> float:
    """``NMI(E; S | L)`` of an (N, S, L) table: ``Σ_l P(l)·I(E; S | L=l) /
    Σ_l P(l)·H(S | L=l)``; 0 when no level has size entropy."""
    return float(conditional_nmis(table))


def expert_size_level_table(weights: np.ndarray, categories: np.ndarray,
                            levels: np.ndarray, num_levels: int) -> np.ndarray:
    """(N, S, L) mass table of n items: gate weights (n, N), 0/1 categories (n, S),
    level indices (n,)."""
    one_hot = np.eye(num_levels)[np.asarray(levels, dtype=np.int64)]
    return np.einsum('ne,ns,nl->esl', np.asarray(weights, dtype=np.float64),
                     np.asarray(categories, dtype=np.float64), one_hot)


def interval(values: Sequence[float], level: float = 0.95) -> list:
    """The central ``level`` percentile interval of ``values``."""
    tail = 100 * (1 - level) / 2
    return [float(v) for v in np.percentile(values, [tail, 100 - tail])]


def _baseline(values: list, permutations: int) -> dict:
    return dict(mean=float(np.mean(values)) if values else 0.0,
                std=float(np.std(values)) if values else 0.0,
                interval=interval(values) if values else [0.0, 0.0],
                permutations=permutations)


def permute_rows(weights: np.ndarray, rng: np.random.Generator,
                 groups: Optional[np.ndarray] = None,
                 strata: Optional[np.ndarray] = None) -> np.ndarray:
    """``weights`` (n, N) with rows permuted: item by item, or with ``groups`` (n,)
    whole groups of items that share one gate row (the detections of one (image,
    level) under a per-(image, level) gate) trade rows, so that sizes clustered in an
    image stay clustered. A group whose rows differ (per-location gates: each
    detection has the row of its prior's location) has no shared row to trade: its
    items are permuted one by one, alongside the whole groups. With ``strata`` (n,),
    rows move only within the same stratum (e.g. FPN level; a whole group moves within
    the stratum of its first item)."""
    weights = np.asarray(weights)
    groups = np.arange(len(weights)) if groups is None else np.asarray(groups)
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    constant = np.ones(len(first), bool)
    np.logical_and.at(constant, inverse, (weights == weights[first][inverse]).all(axis=1))
    # units that trade rows: a constant group, or one item of a varying group
    units = np.where(constant[inverse], inverse, len(first) + np.arange(len(weights)))
    _, first, inverse = np.unique(units, return_index=True, return_inverse=True)
    order = np.arange(len(first))
    unit_strata = np.zeros(len(first)) if strata is None else np.asarray(strata)[first]
    for stratum in np.unique(unit_strata):
        members = np.flatnonzero(unit_strata == stratum)
        order[members] = rng.permutation(members)
    return weights[first][order][inverse.ravel()]


def shuffled_nmi(weights: np.ndarray, categories: np.ndarray, num_categories: int,
                 permutations: int = 20, seed: int = 0,
                 groups: Optional[np.ndarray] = None) -> Dict[str, float]:
    """NMI when expert weights are shuffled across items: the chance level.

    Args:
        weights: (n, N) gate weights of n items (e.g. detections).
        categories: (n, S) 0/1 membership of each item in each category.
        groups: (n,) items sharing one gate row move together (see permute_rows).

    Returns:
        ``mean``, ``std`` and 95 % ``interval`` of the shuffled NMIs.
    """
    weights = np.asarray(weights, dtype=np.float64)
    categories = np.asarray(categories, dtype=np.float64).reshape(len(weights), num_categories)
    rng = np.random.default_rng(seed)
    values = [normalised_mutual_information(permute_rows(weights, rng, groups).T @ categories)
              for _ in range(permutations)]
    return _baseline(values, permutations)


def level_shuffled_nmi(weights: np.ndarray, categories: np.ndarray, levels: np.ndarray,
                       num_levels: int, permutations: int = 20, seed: int = 0,
                       groups: Optional[np.ndarray] = None,
                       strata: Optional[np.ndarray] = None) -> dict:
    """Chance level of :func:`conditional_nmi`: gate weights shuffled among the items
    of the same level only (the level's routing is kept, its link to size is not), or
    within finer ``strata`` (n,) nested in the levels (e.g. (image, level) groups);
    ``groups`` as in :func:`permute_rows`."""
    weights = np.asarray(weights, dtype=np.float64)
    levels = np.asarray(levels, dtype=np.int64)
    strata = levels if strata is None else strata
    rng = np.random.default_rng(seed)
    values = [conditional_nmi(expert_size_level_table(
        permute_rows(weights, rng, groups, strata), categories, levels, num_levels))
        for _ in range(permutations)]
    return _baseline(values, permutations)


def bootstrap(per_image: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray],
              resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """``statistic`` of tables summed over images resampled with replacement.

    Args:
        per_image: (I, ...) one table per image (its detections kept together).
        statistic: (resamples, ...) tables → (resamples, ...) figures, all
            resamples at once.

    Returns:
        (resamples, ...) the figures of each resample.
    """
    per_image = np.asarray(per_image, dtype=np.float64)
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, len(per_image), len(per_image)),
                                   minlength=len(per_image)) for _ in range(resamples)])
    sums = (counts @ per_image.reshape(len(per_image), -1)).reshape(
        resamples, *per_image.shape[1:])
    values = np.asarray(statistic(sums), dtype=np.float64)
    if values.shape[:1] != (resamples,):
        raise ValueError(f'bootstrap: statistic must map the ({resamples}, ...) stack of '
                         f'resampled tables to ({resamples}, ...) figures, got shape '
                         f'{values.shape}')
    return values


def specialisation_intervals(per_image: np.ndarray, resamples: int = 1000,
                             seed: int = 0, with_levels: bool = True) -> dict:
    """95 % bootstrap intervals over images of NMI(E; S), NMI(E; S | L) (when
    ``with_levels``) and each expert's P(size | expert), from (I, N, S, L) tables."""
    per_image = np.asarray(per_image, dtype=np.float64)
    num_experts, num_sizes = per_image.shape[1:3]

    def figures(tables):  # (R, N, S, L) → (R, 2 + N·S)
        flat = tables.sum(axis=3)
        given_level = conditional_nmis(tables) if with_levels else np.zeros(len(tables))
        return np.concatenate([conditional_nmis(flat[..., None])[:, None], given_level[:, None],
                               normalise_rows(flat).reshape(len(tables), -1)], axis=1)

    values = bootstrap(per_image, figures, resamples, seed)
    bounds = np.percentile(values, [2.5, 97.5], axis=0)
    pairs = [[float(lo), float(hi)] for lo, hi in bounds.T]
    return dict(nmi=pairs[0], nmi_given_level=pairs[1] if with_levels else None,
                p_size_given_expert=[pairs[2 + i * num_sizes:2 + (i + 1) * num_sizes]
                                     for i in range(num_experts)],
                resamples=resamples, seed=seed, level=0.95)


def significant(value_interval: Optional[list], baseline: Optional[dict]) -> bool:
    """A specialisation counts only when its interval lies above the baseline's."""
    return bool(value_interval and baseline and 'interval' in baseline and
                value_interval[0] > baseline['interval'][1])


def importance_cv(importance: np.ndarray) -> float:
    """Coefficient of variation (unbiased std / mean) of per-expert importance."""
    importance = np.asarray(importance, dtype=np.float64)
    mean = importance.mean()
    return float(importance.std(ddof=1) / mean) if mean > 0 and len(importance) > 1 else 0.0


def mean_gate_weights(importance: np.ndarray, rows: float) -> np.ndarray:
    """Each expert's mean gate weight over all gate rows, ``Σ_rows g / rows`` (zeros
    without rows): its share of the routing (the shares sum to 1 for gates whose
    weights sum to 1)."""
    importance = np.asarray(importance, dtype=np.float64)
    return importance / rows if rows > 0 else np.zeros_like(importance)


def living_experts(importance: np.ndarray, rows: float, threshold: float = 0.01) -> int:
    """Experts whose mean gate weight over all gate rows exceeds ``threshold``."""
    return int((mean_gate_weights(importance, rows) > threshold).sum())


def dominant(table: np.ndarray, names) -> list:
    """Name of the largest category per expert (None for an unused expert)."""
    table = np.asarray(table, dtype=np.float64)
    return [names[int(row.argmax())] if row.sum() > 0 else None for row in table]


def most_over_represented(table: np.ndarray, names) -> list:
    """Per expert, the category with the largest lift ``P(s | expert) / P(s)``.

    Unlike :func:`dominant`, it is not biased towards the most frequent category
    (e.g. large objects, which get the most confident detections).
    """
    table = np.asarray(table, dtype=np.float64)
    prior = table.sum(axis=0) / max(table.sum(), EPS)
    lift = np.divide(normalise_rows(table), prior, out=np.zeros_like(table), where=prior > 0)
    return [names[int(row.argmax())] if table[i].sum() > 0 else None
            for i, row in enumerate(lift)]


def size_table(layer: dict) -> Tuple[np.ndarray, str]:
    """The expert × size mass table of one layer of an ``expert_size_stats.json`` and
    its view: ``'detection'``, or ``'image'`` when no detection was counted."""
    table = np.asarray(layer['detection']['mass'], dtype=np.float64)
    if table.sum() > 0:
        return table, 'detection'
    return np.asarray(layer['image']['mass'], dtype=np.float64), 'image'


def relative_scale_summary(layer: dict) -> dict:
    """The measure's headline figures of one layer (None when it is absent):
    ``nmi_rel_scale_given_level`` with its interval, the within-(image, level)
    baseline, whether it is beaten (``nmi_rel_scale_significant``) and in words
    (``rel_scale_verdict``); ``rel_scale_absent`` says why it is missing."""
    measure = layer.get('relative_scale')
    if not measure or 'absent' in measure:
        reason = (measure or {}).get('absent', 'the statistics have no relative-scale '
                                               'measure (written before schema version 3)')
        return dict(nmi_rel_scale_given_level=None, nmi_rel_scale_interval=None,
                    nmi_rel_scale_shuffled=None, nmi_rel_scale_shuffled_interval=None,
                    nmi_rel_scale_significant=False, rel_scale_absent=reason,
                    rel_scale_verdict=f'within-level scale not measured: {reason}')
    value, bounds = measure['nmi_given_level'], measure['interval']
    baseline = measure['shuffled_within_image_level']
    # the plug-in value too must clear the baseline: with few detections the bootstrap
    # NMIs sit above it (resampled images inflate an NMI), and per-(image, level) gates
    # give a value equal to the baseline, which must never read as specialisation
    beats = significant(bounds, baseline) and value > baseline['interval'][1]
    if bounds is None:
        words = ('not assessed (no bootstrap interval); compare it with its '
                 'within-(image, level) baseline by eye')
    elif beats:
        words = ('above its within-(image, level) baseline: experts separate relative '
                 'scales within an image\'s level (per-location routing by scale)')
    else:
        words = ('not above its within-(image, level) baseline: what it holds comes '
                 'from image composition, not from routing by scale within a level')
    return dict(nmi_rel_scale_given_level=value, nmi_rel_scale_interval=bounds,
                nmi_rel_scale_shuffled=baseline['mean'],
                nmi_rel_scale_shuffled_interval=baseline['interval'],
                nmi_rel_scale_significant=beats, rel_scale_absent=None,
                rel_scale_verdict=f'NMI expert↔relative scale | level is {words}')


def layer_summary(layer: dict, size_names) -> dict:
    """Headline numbers of one layer of an ``expert_size_stats.json``: the plain and
    the level-conditioned NMI with their baselines and intervals, and in words which
    of the two carries the specialisation (``verdict``). ``view`` says which table the
    NMI and P(size | expert) come from: ``'detection'``, or ``'image'`` when no
    detection reached score_thr (then no baseline, interval or level-conditioned NMI:
    those exist for detections only)."""
    table, view = size_table(layer)
    # baselines, intervals and the level table are of detections: with the image
    # view, none of them is read, so none is paired with its NMI
    of_detections = layer if view == 'detection' else {}
    levels = (of_detections.get('detection_levels') or {}).get('mass')
    intervals = of_detections.get('intervals') or {}
    shuffled = of_detections.get('nmi_shuffled') or {}
    level_shuffled = of_detections.get('nmi_given_level_shuffled') or {}
    summary = dict(
        view=view,
        nmi=normalised_mutual_information(table),
        nmi_shuffled=shuffled.get('mean'),
        nmi_shuffled_interval=shuffled.get('interval'),
        nmi_interval=intervals.get('nmi'),
        nmi_given_level=conditional_nmi(levels) if levels is not None else None,
        nmi_given_level_shuffled=level_shuffled.get('mean'),
        nmi_given_level_shuffled_interval=level_shuffled.get('interval'),
        nmi_given_level_interval=intervals.get('nmi_given_level'),
        nmi_significant=significant(intervals.get('nmi'), shuffled),
        nmi_given_level_significant=significant(intervals.get('nmi_given_level'),
                                                level_shuffled),
        living_experts=living_experts(layer['importance'], layer['rows']),
        num_experts=len(layer['importance']),
        importance_cv=importance_cv(layer['importance']),
        p_size_given_expert=normalise_rows(table).tolist(),
        p_size_given_expert_interval=intervals.get('p_size_given_expert'),
        dominant_size=dominant(table, size_names),
        over_represented_size=most_over_represented(table, size_names),
        **relative_scale_summary(layer))
    summary['verdict'] = verdict(summary)
    return summary


# a level-conditioned NMI below this (1 % of the size entropy left within a level)
# is called negligible, however significant: a large sample makes tiny effects clear
SMALL_WITHIN_LEVEL_NMI = 0.01


def verdict(summary: dict) -> str:
    """Which NMI carries the specialisation, in words."""
    no_levels = ('the level-controlled view needs a run whose statistics have '
                 'per-detection FPN levels (schema version 2 and a head that tags levels, '
                 'such as MoERetinaHead)')
    if summary.get('view') == 'image':
        return ('no detection above score_thr: only the image view (per-image gates × '
                'ground-truth sizes) is available; its NMI is not significance-tested')
    if summary['nmi_interval'] is None:
        return ('significance not assessed: the statistics have no bootstrap interval '
                '(written before schema version 2, or with bootstrap_resamples=0); '
                'compare the NMIs with their baselines by eye' +
                ('; ' + no_levels if summary['nmi_given_level'] is None else ''))
    if summary['nmi_given_level'] is None:
        plain = ('above' if summary['nmi_significant'] else 'not clearly above')
        return f'NMI expert↔size is {plain} its shuffled baseline; {no_levels}'
    within = summary['nmi_given_level']
    if summary['nmi_given_level_significant'] and within < SMALL_WITHIN_LEVEL_NMI:
        return (f'the size specialisation goes mostly through the FPN level: within '
                f'levels the experts carry a significant but negligible share of the size '
                f'information (level-conditioned NMI {within:.4f} < '
                f'{SMALL_WITHIN_LEVEL_NMI}, plain NMI {summary["nmi"]:.4f})')
    if summary['nmi_given_level_significant']:
        return (f'experts specialise by size within FPN levels: the level-conditioned '
                f'NMI ({within:.4f}) lies above its within-level shuffled baseline')
    if summary['nmi_significant']:
        return ('the size specialisation goes through the FPN level: experts route by '
                'level (plain NMI above its baseline, level-conditioned NMI not)')
    return 'no significant size specialisation (neither NMI above its baseline)'
