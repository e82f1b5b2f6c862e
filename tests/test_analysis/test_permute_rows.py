"""permute_rows: whole groups trade a shared gate row, groups whose rows differ
(per-location gates) are permuted item by item; checked against brute-force
enumeration of the permutations each case allows."""
import itertools

import numpy as np

from mmdet_moe.analysis.metrics import permute_rows


def outcomes(weights, groups=None, strata=None, draws=400):
    """The distinct results of ``draws`` calls."""
    rng = np.random.default_rng(0)
    return {tuple(map(tuple, permute_rows(weights, rng, groups, strata)))
            for _ in range(draws)}


def assignments(rows, units, n):
    """Brute force: every way of giving the rows of ``units`` (lists of item
    indices, each unit holding one row) to the units, as (n, N) tuples."""
    results = set()
    for order in itertools.permutations(range(len(units))):
        out = [None] * n
        for unit, source in zip(units, order):
            for item in unit:
                out[item] = tuple(rows[source])
        results.add(tuple(out))
    return results


def test_constant_groups_trade_their_shared_row():
    a, b = [1.0, 0.0], [0.0, 1.0]
    weights = np.array([a, a, b])
    expected = assignments([a, b], [[0, 1], [2]], 3)
    assert outcomes(weights, groups=np.array([0, 0, 1])) == expected


def test_groups_whose_rows_differ_are_permuted_item_by_item():
    """Group 0 has one shared row (moves whole), group 1 holds two different
    per-location rows (each its own unit): the 3! assignments of 3 rows to 3 units.
    Handing a group its first row gave both of group 1's items one row, c or a, and
    never d to one of them alone."""
    a, c, d = [1.0, 0.0], [0.5, 0.5], [0.0, 1.0]
    weights = np.array([a, a, c, d])
    expected = assignments([a, c, d], [[0, 1], [2], [3]], 4)
    got = outcomes(weights, groups=np.array([0, 0, 1, 1]))
    assert got == expected


def test_rows_move_only_within_their_stratum():
    a, c, d, e = [1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.2, 0.8]
    weights = np.array([a, c, d, e])
    strata = np.array([0, 0, 1, 1])
    expected = {(x, y, z, w) for x, y in itertools.permutations([tuple(a), tuple(c)])
                for z, w in itertools.permutations([tuple(d), tuple(e)])}
    assert outcomes(weights, strata=strata) == expected
    # per-(image, level) strata: rows shuffled within each group only, so identical
    # rows (a per-image gate) come back unchanged
    same = np.array([a, a, d, d])
    assert outcomes(same, strata=strata) == {tuple(map(tuple, same))}
