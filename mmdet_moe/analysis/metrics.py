r"""Specialisation metrics on expert × category tables (categories: sizes, classes, levels).

A table ``M`` (N experts × S categories) holds gate mass (or counts). With the joint
``p(e, s) = M / ΣM``:

- ``P(size | expert)``: rows of M normalised; ``P(expert | size)``: columns.
- dominant category per expert: argmax of its row.
- normalised mutual information ``NMI = I(E; S) / H(S)`` in [0, 1]: the fraction of
  the size entropy explained by the expert; 0 = no specialisation.
"""
from typing import Dict, Tuple

import numpy as np

EPS = 1e-12


def normalise_rows(table: np.ndarray) -> np.ndarray:
    table = np.asarray(table, dtype=np.float64)
    sums = table.sum(axis=1, keepdims=True)
    return np.divide(table, sums, out=np.zeros_like(table), where=sums > 0)


def normalise_columns(table: np.ndarray) -> np.ndarray:
    return normalise_rows(np.asarray(table, dtype=np.float64).T).T


def entropy(p: np.ndarray) -> float:
    p = np.asarray(p, dtype=np.float64).ravel()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def normalised_mutual_information(table: np.ndarray) -> float:
    """``I(E; S) / H(S)`` of the joint distribution proportional to ``table``."""
    table = np.asarray(table, dtype=np.float64)
    total = table.sum()
    if total <= 0:
        return 0.0
    joint = table / total
    h_size = entropy(joint.sum(axis=0))
    if h_size <= EPS:
        return 0.0
    mutual = h_size + entropy(joint.sum(axis=1)) - entropy(joint)
    return float(max(mutual, 0.0) / h_size)


def shuffled_nmi(weights: np.ndarray, categories: np.ndarray, num_categories: int,
                 permutations: int = 20, seed: int = 0) -> Dict[str, float]:
    """NMI when expert weights are shuffled across items: the chance level.

    Args:
        weights: (n, N) gate weights of n items (e.g. detections).
        categories: (n, S) 0/1 membership of each item in each category.
    """
    weights = np.asarray(weights, dtype=np.float64)
    categories = np.asarray(categories, dtype=np.float64).reshape(len(weights), num_categories)
    rng = np.random.default_rng(seed)
    values = [normalised_mutual_information(weights[rng.permutation(len(weights))].T @
                                            categories) for _ in range(permutations)]
    return dict(mean=float(np.mean(values)) if values else 0.0,
                std=float(np.std(values)) if values else 0.0, permutations=permutations)


def importance_cv(importance: np.ndarray) -> float:
    """Coefficient of variation (unbiased std / mean) of per-expert importance."""
    importance = np.asarray(importance, dtype=np.float64)
    mean = importance.mean()
    return float(importance.std(ddof=1) / mean) if mean > 0 and len(importance) > 1 else 0.0


def living_experts(importance: np.ndarray, rows: float, threshold: float = 0.01) -> int:
    """Experts whose mean gate weight over all gate rows exceeds ``threshold``."""
    if rows <= 0:
        return 0
    return int((np.asarray(importance, dtype=np.float64) / rows > threshold).sum())


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


def layer_summary(layer: dict, size_names) -> dict:
    """Headline numbers of one layer of an ``expert_size_stats.json``."""
    table, _ = size_table(layer)
    return dict(
        nmi=normalised_mutual_information(table),
        nmi_shuffled=(layer.get('nmi_shuffled') or {}).get('mean'),
        living_experts=living_experts(layer['importance'], layer['rows']),
        num_experts=len(layer['importance']),
        importance_cv=importance_cv(layer['importance']),
        dominant_size=dominant(table, size_names),
        over_represented_size=most_over_represented(table, size_names))
