"""Level-controlled specialisation and its uncertainty, against independent
computations on hand-made tables."""
import numpy as np
import pytest

from mmdet_moe.analysis import (BUCKET_NAMES, bootstrap, conditional_nmi,
                                expert_size_level_table, layer_summary,
                                level_shuffled_nmi, normalised_mutual_information,
                                specialisation_intervals)


def reference_conditional_nmi(table):
    """I(E; S | L) / H(S | L) written from the definitions with p(e, s, l)."""
    p = np.asarray(table, float) / np.sum(table)
    p_l, p_el, p_sl = p.sum((0, 1)), p.sum(1), p.sum(0)
    mutual = sum(p[e, s, l] * np.log(p_l[l] * p[e, s, l] / (p_el[e, l] * p_sl[s, l]))
                 for e, s, l in zip(*np.nonzero(p)))
    h_size = -sum(p_sl[s, l] * np.log(p_sl[s, l] / p_l[l]) for s, l in zip(*np.nonzero(p_sl)))
    return mutual / h_size


def test_zero_when_size_is_independent_of_expert_within_each_level():
    table = np.zeros((2, 3, 2))
    table[0, :2, 0] = 1      # level P3: expert 0 only, small and medium objects
    table[1, 1:, 1] = 1      # level P4: expert 1 only, medium and large objects
    assert normalised_mutual_information(table.sum(2)) > 0.3  # dependent overall
    assert conditional_nmi(table) == pytest.approx(0.0, abs=1e-12)


def test_one_when_the_expert_decides_size_within_each_level():
    table = np.zeros((2, 3, 2))
    table[0, 0, 0] = table[1, 1, 0] = 3    # P3: expert 0 small, expert 1 medium
    table[0, 2, 1] = table[1, 1, 1] = 2    # P4: expert 0 large, expert 1 medium
    assert conditional_nmi(table) == pytest.approx(1.0)


def test_matches_the_definition_on_a_random_table():
    table = np.random.default_rng(0).random((4, 3, 5))
    assert conditional_nmi(table) == pytest.approx(reference_conditional_nmi(table))


def items(n=600, seed=0):
    """Detections whose expert follows their level only; size follows the level."""
    rng = np.random.default_rng(seed)
    levels = rng.integers(0, 3, n)
    sizes = np.clip(levels + rng.integers(-1, 2, n), 0, 2)
    weights = np.eye(3)[levels] * 0.8 + 0.1
    return weights, np.eye(3)[sizes], levels


def test_level_shuffled_baseline_explains_routing_by_level():
    weights, buckets, levels = items()
    table = expert_size_level_table(weights, buckets, levels, 3)
    assert normalised_mutual_information(table.sum(2)) > 0.1
    baseline = level_shuffled_nmi(weights, buckets, levels, 3, permutations=20)
    # within a level the expert is constant: nothing beyond the level, shuffled or not
    assert conditional_nmi(table) == pytest.approx(0.0, abs=1e-9)
    assert baseline['mean'] == pytest.approx(0.0, abs=1e-9)
    assert len(baseline['interval']) == 2


def test_bootstrap_resamples_whole_images():
    per_image = np.array([[1.0], [100.0]])  # image 0: one unit, image 1: a hundred
    sums = bootstrap(per_image, lambda t: t, resamples=200, seed=0)
    assert set(np.round(sums.ravel(), 6)) <= {2.0, 101.0, 200.0}


def test_intervals_bracket_the_estimate_and_collapse_for_identical_images():
    table = np.random.default_rng(1).random((4, 3, 2))
    intervals = specialisation_intervals(np.stack([table] * 5), resamples=50)
    for key, value in (('nmi', normalised_mutual_information(table.sum(2))),
                       ('nmi_given_level', conditional_nmi(table))):
        assert intervals[key] == pytest.approx([value, value])
    assert len(intervals['p_size_given_expert']) == 4


def stats_layer(with_levels=True):
    weights, buckets, levels = items()
    table = expert_size_level_table(weights, buckets, levels, 3)
    layer = dict(detection=dict(mass=table.sum(2).tolist()), image=dict(mass=[[0] * 3] * 3),
                 importance=[1.0, 1.0, 1.0], rows=3,
                 nmi_shuffled=dict(mean=0.01, std=0.0, interval=[0.0, 0.02]))
    if with_levels:
        layer.update(detection_levels=dict(mass=table.tolist()),
                     nmi_given_level_shuffled=dict(mean=0.0, std=0.0, interval=[0.0, 0.0]),
                     intervals=dict(nmi=[0.2, 0.3], nmi_given_level=[0.0, 0.0]))
    return layer


def test_summary_says_which_nmi_carries_the_specialisation():
    summary = layer_summary(stats_layer(), BUCKET_NAMES)
    assert summary['nmi_significant'] and not summary['nmi_given_level_significant']
    assert 'goes through the FPN level' in summary['verdict']
    old = layer_summary(stats_layer(with_levels=False), BUCKET_NAMES)  # version-1 files
    assert old['nmi_given_level'] is None and 'needs a run' in old['verdict']


def test_group_baseline_keeps_images_together():
    """Gates independent of size, sizes clustered per image: shuffling single
    detections underestimates the chance level; moving each (image, level) group's
    shared row together does not (the observed NMI stays within its interval)."""
    from mmdet_moe.analysis import shuffled_nmi
    rng = np.random.default_rng(0)
    images = 60
    image_rows = rng.dirichlet([1, 1, 1, 1], images)
    image_size = rng.integers(0, 3, images)       # each image: mostly one size
    per_image = 8
    weights = np.repeat(image_rows, per_image, axis=0)
    sizes = np.where(rng.random(images * per_image) < 0.8,
                     np.repeat(image_size, per_image), rng.integers(0, 3, images * per_image))
    buckets = np.eye(3)[sizes]
    groups = np.repeat(np.arange(images), per_image)
    observed = normalised_mutual_information(weights.T @ buckets)
    by_item = shuffled_nmi(weights, buckets, 3, permutations=50)
    by_group = shuffled_nmi(weights, buckets, 3, permutations=50, groups=groups)
    assert observed > by_item['interval'][1]            # a spurious "specialisation"
    assert by_group['interval'][0] <= observed <= by_group['interval'][1]


def test_verdict_without_intervals_does_not_claim_anything():
    layer = stats_layer()
    layer.pop('intervals')
    assert 'not assessed' in layer_summary(layer, BUCKET_NAMES)['verdict']


@pytest.mark.parametrize('within, words', [
    (0.0006, 'mostly through the FPN level'),  # the demo's case: significant, negligible
    (0.2, 'experts specialise by size within FPN levels')])
def test_verdict_weighs_a_significant_within_level_nmi_by_its_size(within, words):
    from mmdet_moe.analysis import verdict
    summary = dict(nmi=0.42, nmi_interval=[0.40, 0.44], nmi_significant=True,
                   nmi_given_level=within, nmi_given_level_significant=True)
    text = verdict(summary)
    assert words in text and f'{within:.4f}' in text


def no_detection_layer():
    """A layer as the hook writes it when no detection reached score_thr: detection
    tables all zero, baselines of zero weights (0 ± 0), no intervals; the image view
    (per-image gates × ground-truth sizes) has each expert on one size."""
    layer = stats_layer()
    zeros = np.zeros((3, 3, 3))
    layer.update(detection=dict(mass=zeros.sum(2).tolist()),
                 detection_levels=dict(mass=zeros.tolist()),
                 image=dict(mass=np.diag([4.0, 2.0, 1.0]).tolist()),
                 nmi_shuffled=dict(mean=0.0, std=0.0, interval=[0.0, 0.0]),
                 nmi_given_level_shuffled=dict(mean=0.0, std=0.0, interval=[0.0, 0.0]),
                 intervals=None)
    return layer


def test_without_detections_only_the_image_view_is_summarised():
    """Defect: the image-view NMI was shown beside the detection view's shuffled
    baseline (and a level-conditioned NMI of an all-zero table)."""
    from mmdet_moe.analysis import specialisation_lines
    assert layer_summary(stats_layer(), BUCKET_NAMES)['view'] == 'detection'
    layer = no_detection_layer()
    # figures of the detection view left in the file must not be paired with it either
    layer['intervals'] = dict(nmi=[0.2, 0.3], nmi_given_level=[0.0, 0.0],
                              p_size_given_expert=[[[0.0, 1.0]] * 3] * 3)
    summary = layer_summary(layer, BUCKET_NAMES)
    assert summary['view'] == 'image'
    assert summary['nmi'] == pytest.approx(1.0)  # each expert sees one size only
    for key in ('nmi_shuffled', 'nmi_shuffled_interval', 'nmi_interval', 'nmi_given_level',
                'nmi_given_level_shuffled', 'nmi_given_level_shuffled_interval',
                'nmi_given_level_interval', 'p_size_given_expert_interval'):
        assert summary[key] is None, key
    assert not summary['nmi_significant'] and not summary['nmi_given_level_significant']
    assert summary['verdict'] == (
        'no detection above score_thr: only the image view (per-image gates × '
        'ground-truth sizes) is available; its NMI is not significance-tested')
    lines = specialisation_lines(summary)
    assert lines[0] == ('NMI expert↔size, image view (per-image gates × ground-truth '
                        'sizes): 1.0000; no detection-view baseline (no detection above '
                        'score_thr)')
    assert not any('shuffled' in line or 'CI' in line for line in lines), lines
    assert lines[1] == 'expert 0: P(size | expert) small 1.000, medium 0.000, large 0.000'
