"""The within-level scale measure: NMI(expert; relative scale | FPN level).

A detection's relative scale is ``log2(√(w·h) / s_l)``, its box area against the
reference size s_l of its FPN level (``mmdet_moe.models.level_reference_sizes``).
Relative scales are binned by per-level quantiles of all counted detections, so each
level's bins are equally full and the NMI does not depend on s_l (only the recorded
edges do). The baseline that matters shuffles gate weights within each (image, level)
group: with a per-(image, level) gate it changes nothing (the measure equals it: the
negative control), with per-location gates it keeps each image's composition and
breaks only the link between a detection's row and its scale.
"""
from typing import List, Optional, Sequence

import numpy as np

from .metrics import (bootstrap, conditional_nmi, conditional_nmis, interval,
                      level_shuffled_nmi)

# areas below this (degenerate boxes) are clipped so their log stays finite
MIN_AREA = 1e-6


def check_bins(bins: Optional[int]) -> None:
    """``bins``: an int >= 2, or None (no measure)."""
    if bins is not None and (isinstance(bins, bool) or not isinstance(bins, int)
                             or bins < 2):
        raise ValueError(f'relative_scale_bins must be an int >= 2 (quantile bins per FPN '
                         f'level) or None to leave the measure out, got {bins!r}')


def relative_scales(areas: np.ndarray, levels: np.ndarray,
                    reference_sizes: Sequence[float]) -> np.ndarray:
    """(n,) ``log2(√area / s_level)`` of n items with box ``areas`` (n,) and FPN
    ``levels`` (n,) indexing ``reference_sizes``."""
    levels = np.asarray(levels, dtype=np.int64)
    if len(levels) and levels.max() >= len(reference_sizes):
        raise ValueError(f'a detection of FPN level {int(levels.max())} but reference '
                         f'sizes for {len(reference_sizes)} levels only: '
                         f'{list(reference_sizes)}')
    sizes = np.asarray(reference_sizes, dtype=np.float64)[levels]
    return 0.5 * np.log2(np.maximum(np.asarray(areas, dtype=np.float64), MIN_AREA)) \
        - np.log2(sizes)


def quantile_edges(scales: np.ndarray, levels: np.ndarray, num_levels: int,
                   bins: int) -> List[Optional[List[float]]]:
    """Per level, the ``bins + 1`` quantiles (0, 1/bins, ..., 1) of the relative
    ``scales`` of its items; None for a level without items."""
    return [np.quantile(scales[levels == level], np.linspace(0, 1, bins + 1)).tolist()
            if np.any(levels == level) else None for level in range(num_levels)]


def bin_membership(scales: np.ndarray, levels: np.ndarray,
                   edges: List[Optional[List[float]]], bins: int) -> np.ndarray:
    """(n, bins) one-hot: the quantile bin of each item within its level (a value on
    an inner edge goes to the upper bin)."""
    index = np.zeros(len(scales), np.int64)
    for level, level_edges in enumerate(edges):
        at = levels == level
        if level_edges is not None:
            index[at] = np.searchsorted(level_edges[1:-1], scales[at], side='right')
    return np.eye(bins)[index]


def relative_scale_stats(weights: np.ndarray, scales: np.ndarray, levels: np.ndarray,
                         num_levels: int, image_of: np.ndarray, groups: np.ndarray,
                         num_images: int, bins: int, reference_sizes: Sequence[float],
                         permutations: int = 20, seed: int = 0,
                         resamples: int = 1000) -> dict:
    """The ``relative_scale`` object of one layer of ``expert_size_stats.json``.

    Args:
        weights: (n, N) gate weights of the n counted detections.
        scales: (n,) their relative scales; levels: (n,) their FPN levels.
        image_of: (n,) image index; groups: (n,) (image, level) group id.
        num_images: images evaluated (the bootstrap resamples them).

    Returns:
        ``bins``, ``reference_sizes``, ``edges`` (per level), ``mass`` (N, bins, L),
        ``nmi_given_level``, its bootstrap ``interval`` (None without detections or
        resamples), and the baselines ``shuffled_within_image_level`` and
        ``shuffled_within_level`` (mean, std, interval, permutations).
    """
    edges = quantile_edges(scales, levels, num_levels, bins)
    members = bin_membership(scales, levels, edges, bins)
    per_image = np.zeros((num_images, weights.shape[1], bins, num_levels))
    np.add.at(per_image, (image_of,), np.einsum('ne,nq,nl->neql', weights, members,
                                               np.eye(num_levels)[levels]))
    counted = weights.sum() > 0 and resamples > 0
    return dict(
        bins=bins, reference_sizes=[float(s) for s in reference_sizes], edges=edges,
        mass=per_image.sum(0).tolist(),
        nmi_given_level=conditional_nmi(per_image.sum(0)),
        interval=interval(bootstrap(per_image, conditional_nmis, resamples, seed))
        if counted else None,
        shuffled_within_image_level=level_shuffled_nmi(
            weights, members, levels, num_levels, permutations, seed, strata=groups),
        shuffled_within_level=level_shuffled_nmi(
            weights, members, levels, num_levels, permutations, seed, groups))


def absent(reason: str) -> dict:
    """The ``relative_scale`` object of a run without the measure, saying why."""
    return dict(absent=reason)
