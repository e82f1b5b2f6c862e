"""The within-level scale measure NMI(expert; relative scale | level) and the
controls that bracket it, against independent computations."""
import math
from collections import defaultdict

import numpy as np
import pytest

from mmdet_moe.analysis import BUCKET_NAMES, layer_summary
from mmdet_moe.analysis.metrics import relative_scale_summary
from mmdet_moe.analysis.relative_scale import (absent, bin_membership, check_bins,
                                               quantile_edges, relative_scale_stats,
                                               relative_scales)


def brute_force_nmi(weights, bins, levels):
    """I(E; Q | L) / H(Q | L) from the items one by one, p(e, q, l) ∝ Σ gate weight."""
    p = defaultdict(float)
    for row, q, level in zip(weights, bins, levels):
        for e, w in enumerate(row):
            p[e, q, level] += w
    total = sum(p.values())
    p = {k: v / total for k, v in p.items() if v > 0}
    marginal = defaultdict(float)
    for (e, q, level), v in p.items():
        for key in (('l', level), ('el', e, level), ('ql', q, level)):
            marginal[key] += v
    mutual = sum(v * math.log(marginal['l', level] * v /
                              (marginal['el', e, level] * marginal['ql', q, level]))
                 for (e, q, level), v in p.items())
    entropy = -sum(v * math.log(v / marginal['l', k[2]])
                   for k, v in marginal.items() if k[0] == 'ql')
    return mutual / entropy


def test_relative_scale_is_log2_of_the_side_over_the_level_reference():
    areas = np.array([32.0 ** 2, 16.0 ** 2, 256.0 ** 2, 0.0])
    levels = np.array([0, 0, 1, 1])
    scales = relative_scales(areas, levels, [32.0, 64.0])
    assert scales[:3].tolist() == pytest.approx([0.0, -1.0, 2.0])
    assert np.isfinite(scales[3])  # a degenerate box stays finite
    with pytest.raises(ValueError, match='FPN level 2 but reference sizes for 2 levels'):
        relative_scales(areas, np.array([0, 1, 2, 0]), [32.0, 64.0])


@pytest.mark.parametrize('bins', [1, 0, 2.5, True, '4'])
def test_bins_must_be_an_int_of_at_least_two(bins):
    with pytest.raises(ValueError, match=f'relative_scale_bins must be an int >= 2 .*'
                                         f'got {bins!r}'):
        check_bins(bins)
    check_bins(None)  # leaves the measure out


def test_quantile_bins_fill_each_level_equally():
    rng = np.random.default_rng(0)
    levels = np.repeat([0, 1], [40, 80])
    scales = rng.normal(size=120) + levels
    edges = quantile_edges(scales, levels, 3, 4)
    assert edges[2] is None  # no detection on the third level
    members = bin_membership(scales, levels, edges, 4)
    for level, size in ((0, 40), (1, 80)):
        counts = members[levels == level].sum(0)
        assert counts.tolist() == [size // 4] * 4
        # each bin holds the detections of one rank quarter of its level
        ranks = np.argsort(np.argsort(scales[levels == level]))
        assert (members[levels == level].argmax(1) == ranks * 4 // size).all()


def detections(per_location: bool, images=40, per_group=6, image_spread=0.5, seed=0):
    """Detections on 2 levels; relative scales spread within each (image, level).
    Per-location gates route by relative scale (expert = which of 4 scale ranges,
    soft); per-(image, level) gates give a group one random row."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(images * 2), per_group)
    image_of, levels = groups // 2, groups % 2
    # sizes cluster per image (a composition effect for the baselines to catch)
    scales = rng.normal(size=len(groups)) * 0.8 + rng.normal(size=images)[image_of] * image_spread
    if per_location:
        centres = np.array([-1.5, -0.5, 0.5, 1.5])
        logits = -((scales[:, None] - centres) ** 2) / 0.05
        weights = np.exp(logits - logits.max(1, keepdims=True))
        weights /= weights.sum(1, keepdims=True)
    else:
        weights = rng.dirichlet([0.5] * 4, images * 2)[groups]
    return weights, scales, levels, image_of, groups, images


def measure(weights, scales, levels, image_of, groups, images, permutations=20):
    return relative_scale_stats(weights, scales, levels, 2, image_of, groups, images,
                                bins=4, reference_sizes=[32.0, 64.0],
                                permutations=permutations, resamples=200)


def test_the_nmi_matches_a_brute_force_computation():
    weights, scales, levels, image_of, groups, images = detections(per_location=True)
    stats = measure(weights, scales, levels, image_of, groups, images)
    bins = bin_membership(scales, levels, stats['edges'], 4).argmax(1)
    assert stats['nmi_given_level'] == pytest.approx(brute_force_nmi(weights, bins, levels))
    np.testing.assert_allclose(np.asarray(stats['mass']).sum((1, 2)), weights.sum(0))


def test_positive_control_routing_by_relative_scale():
    """Per-location gates that are a known function of relative scale: near 1, far
    above the within-(image, level) baseline, and called so."""
    stats = measure(*detections(per_location=True))
    baseline = stats['shuffled_within_image_level']
    assert stats['nmi_given_level'] > 0.6
    assert stats['interval'][0] > baseline['interval'][1]
    assert baseline['mean'] < 0.3 * stats['nmi_given_level']
    summary = layer_summary(dict(detection=dict(mass=[[1, 0, 0]] * 4),
                                 image=dict(mass=[[0, 0, 0]] * 4), importance=[1] * 4,
                                 rows=4, relative_scale=stats), BUCKET_NAMES)
    assert summary['nmi_rel_scale_significant']
    assert 'above its within-(image, level) baseline' in summary['rel_scale_verdict']


def test_negative_control_per_image_level_gates_equal_their_baseline():
    """A per-(image, level) gate: image composition gives the measure a value, but
    shuffling within each (image, level) changes nothing, so the baseline equals it
    exactly and it is not called specialisation."""
    stats = measure(*detections(per_location=False, per_group=2, image_spread=2.0))
    baseline = stats['shuffled_within_image_level']
    assert stats['nmi_given_level'] > 0.01  # composition alone
    assert baseline['mean'] == pytest.approx(stats['nmi_given_level'], abs=1e-12)
    assert baseline['std'] == pytest.approx(0.0, abs=1e-12)
    summary = layer_summary(dict(detection=dict(mass=[[1, 0, 0]] * 4),
                                 image=dict(mass=[[0, 0, 0]] * 4), importance=[1] * 4,
                                 rows=4, relative_scale=stats), BUCKET_NAMES)
    assert not summary['nmi_rel_scale_significant']
    assert 'not above its within-(image, level) baseline' in summary['rel_scale_verdict']


def test_an_absent_measure_says_why():
    layer = dict(detection=dict(mass=[[1, 0, 0]]), image=dict(mass=[[0, 0, 0]]),
                 importance=[1], rows=1)
    old = layer_summary(layer, BUCKET_NAMES)
    assert old['nmi_rel_scale_given_level'] is None
    assert 'written before schema version 3' in old['rel_scale_verdict']
    layer['relative_scale'] = absent('two-stage')
    assert layer_summary(layer, BUCKET_NAMES)['rel_scale_absent'] == 'two-stage'


def test_a_bootstrap_interval_above_its_own_value_does_not_beat_the_baseline():
    """With few detections the bootstrap resamples' NMIs sit above the plug-in value
    (duplicated images inflate it); per-(image, level) gates give a measure equal to
    its baseline, and that must never read as specialisation (measured: a MoE FPN
    lateral conv, NMI 0.012 with interval [0.015, 0.128] and baseline 0.012)."""
    baseline = dict(mean=0.012, std=0.0, interval=[0.012, 0.012], permutations=20)
    layer = dict(relative_scale=dict(nmi_given_level=0.012, interval=[0.015, 0.128],
                                     shuffled_within_image_level=baseline))
    summary = relative_scale_summary(layer)
    assert not summary['nmi_rel_scale_significant']
    assert 'not above' in summary['rel_scale_verdict']
