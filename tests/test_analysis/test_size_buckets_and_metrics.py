"""COCO size buckets agree with pycocotools; metrics on hand-made tables."""
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mmdet_moe.analysis import (bucket_membership, importance_cv, living_experts,
                                normalise_columns, normalise_rows,
                                normalised_mutual_information, shuffled_nmi)

BOUNDARY_AREAS = [31.9 ** 2, 32.0 ** 2, 50.0 ** 2, 96.0 ** 2, 96.1 ** 2]


def pycocotools_membership(areas):
    """Which areaRng buckets COCOeval does not ignore each GT in (ground truth)."""
    gt = COCO()
    gt.dataset = dict(
        images=[dict(id=1, width=2000, height=2000)],
        categories=[dict(id=1, name='x')],
        annotations=[dict(id=i + 1, image_id=1, category_id=1, iscrowd=0, area=a,
                          bbox=[0, 0, 10, 10]) for i, a in enumerate(areas)])
    gt.createIndex()
    dt = gt.loadRes([dict(image_id=1, category_id=1, bbox=[0, 0, 10, 10], score=1.0)])
    ev = COCOeval(gt, dt, 'bbox')
    ev.evaluate()
    rows = []
    for rng in ev.params.areaRng[1:]:  # small, medium, large
        img = ev.evaluateImg(1, 1, rng, 100)
        order = img['gtIds']
        ignored = dict(zip(order, img['gtIgnore'], strict=True))
        rows.append([not ignored[i + 1] for i in range(len(areas))])
    return np.array(rows).T


def test_boundaries_match_pycocotools():
    ours = bucket_membership(BOUNDARY_AREAS)
    assert ours.tolist() == pycocotools_membership(BOUNDARY_AREAS).tolist()
    # exactly 32² and 96² count in both neighbouring buckets, as in COCOeval
    assert ours[1].tolist() == [True, True, False]
    assert ours[3].tolist() == [False, True, True]


def test_nmi_hand_values():
    # perfect specialisation: expert 0 only small, expert 1 only large -> NMI 1
    assert normalised_mutual_information([[5, 0], [0, 5]]) == pytest.approx(1.0)
    # independent: every expert has the same size distribution -> NMI 0
    assert normalised_mutual_information([[2, 4], [1, 2]]) == pytest.approx(0.0, abs=1e-12)
    # joint [[.5, .25], [0, .25]]: H(S) = H(.5,.5), I = H(S) + H(E) - H(E,S)
    h = lambda *p: -sum(x * math.log(x) for x in p if x > 0)  # noqa: E731
    expected = (h(.5, .5) + h(.75, .25) - h(.5, .25, .25)) / h(.5, .5)
    assert normalised_mutual_information([[2, 1], [0, 1]]) == pytest.approx(expected)
    assert normalised_mutual_information(np.zeros((3, 3))) == 0.0


def test_conditionals_cv_and_living_experts():
    table = np.array([[3., 1.], [0., 0.], [1., 1.]])
    np.testing.assert_allclose(normalise_rows(table), [[.75, .25], [0, 0], [.5, .5]])
    np.testing.assert_allclose(normalise_columns(table), [[.75, .5], [0, 0], [.25, .5]])
    assert importance_cv([1., 2., 3.]) == pytest.approx(0.5)  # std 1 / mean 2
    assert living_experts([50., 0.5, 49.5], rows=100) == 2  # mean 0.005 is dead


def test_shuffled_nmi_is_near_zero_for_a_specialised_but_shuffled_layer():
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 3, 600)
    weights = np.eye(3)[sizes]  # expert i sees only size i: NMI 1
    buckets = np.eye(3)[sizes]
    assert normalised_mutual_information(weights.T @ buckets) == pytest.approx(1.0)
    chance = shuffled_nmi(weights, buckets, 3, permutations=10)
    assert chance['mean'] < 0.02 and chance['permutations'] == 10


def test_over_representation_corrects_for_frequent_sizes():
    from mmdet_moe.analysis import dominant, most_over_represented
    # both experts see mostly large objects, but expert 1 twice the share of small ones
    table = np.array([[1., 9.], [2., 8.]])
    assert dominant(table, ['small', 'large']) == ['large', 'large']
    assert most_over_represented(table, ['small', 'large']) == ['large', 'small']
