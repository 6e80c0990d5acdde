"""Choosing the next token: argument checks, greedy, reproducibility, and the distribution a draw follows.

The expected distributions come from ``reference_candidates`` below, a plain re-statement of the documented rule
(softmax(logits / T) -> keep the topk most likely, ties to the lower id -> keep the smallest most-likely-first prefix
whose mass reaches topp, within TOP_P_SLACK -> renormalise), and from cases worked out by hand.
"""

import math

import numpy as np
import pytest

from qwen3moe.sampling import TOP_P_SLACK, candidate_distribution, check_sampling, is_greedy, sample


def softmax(x) -> np.ndarray:
    z = np.asarray(x, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def reference_candidates(logits, temperature, topk, topp) -> tuple[list[int], np.ndarray]:
    p = softmax(np.asarray(logits, dtype=np.float64) / temperature)
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    if topk:
        order = order[:topk]
    q = p[order] / p[order].sum()
    # a prefix whose mass falls short of topp by less than the slack counts as reaching it (about 1 draw in 10^4 of
    # the random cases below lands there)
    n = next(k for k in range(1, len(q) + 1) if q[:k].sum() >= topp - TOP_P_SLACK or k == len(q))
    return order[:n], q[:n] / q[:n].sum()


# --- check_sampling -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, valid_range", [
    ((-0.1, 0, 1.0), "temperature must be a finite number >= 0"),
    ((-1, 0, 1.0), "temperature must be a finite number >= 0"),
    ((math.nan, 0, 1.0), "temperature must be a finite number >= 0"),
    ((math.inf, 0, 1.0), "temperature must be a finite number >= 0"),
    (("0.7", 0, 1.0), "temperature must be a finite number >= 0"),
    ((None, 0, 1.0), "temperature must be a finite number >= 0"),
    ((1.0, -1, 1.0), "topk must be an integer >= 0"),
    ((1.0, 2.0, 1.0), "topk must be an integer >= 0"),
    ((1.0, 2.5, 1.0), "topk must be an integer >= 0"),
    ((1.0, True, 1.0), "topk must be an integer >= 0"),
    ((1.0, False, 1.0), "topk must be an integer >= 0"),
    ((1.0, 0, 0), "topp must be in (0, 1]"),
    ((1.0, 0, 0.0), "topp must be in (0, 1]"),
    ((1.0, 0, -0.5), "topp must be in (0, 1]"),
    ((1.0, 0, 1.0000001), "topp must be in (0, 1]"),
    ((1.0, 0, 2), "topp must be in (0, 1]"),
    ((1.0, 0, math.nan), "topp must be in (0, 1]"),
    ((1.0, 0, math.inf), "topp must be in (0, 1]"),
])
def test_bad_settings_are_rejected_with_the_valid_range(settings, valid_range):
    with pytest.raises(ValueError) as e:
        check_sampling(*settings)
    assert valid_range in str(e.value)
    bad = next(v for v, name in zip(settings, ("temperature", "topk", "topp")) if name in valid_range)
    assert f"got {bad!r}" in str(e.value)  # and says what it got


@pytest.mark.parametrize("settings", [(0.0, 0, 1.0), (0, 0, 1), (1e-3, 50, 1e-6), (2.5, np.int64(5), 0.5),
                                      (0.6, 20, 0.95), (np.float64(0.7), 3, np.float64(0.9))])
def test_good_settings_are_accepted(settings):
    check_sampling(*settings)


def test_numpy_float32_settings_are_accepted():
    check_sampling(np.float32(0.7), np.int32(5), np.float32(0.9))


# --- greedy ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature, topk", [(0.0, 0), (0, 5), (0.0, 1), (1.0, 1), (3.0, 1)])
def test_greedy_is_argmax_with_ties_to_the_lower_id(temperature, topk, rng):
    assert is_greedy(temperature, topk)
    logits = np.array([0.1, 2.0, -1.0, 2.0, 2.0], dtype=np.float32)
    for _ in range(20):
        assert sample(logits, temperature, topk, 1.0, rng) == 1
    random_logits = rng.standard_normal(1000).astype(np.float32)
    assert sample(random_logits, temperature, topk, 0.5, rng) == int(np.argmax(random_logits))


def test_not_greedy_otherwise():
    assert not is_greedy(0.5, 0) and not is_greedy(1.0, 2)


# --- reproducibility --------------------------------------------------------------------------------------------------


def draws(logits, seed, n=300, temperature=1.0, topk=0, topp=1.0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [sample(logits, temperature, topk, topp, rng) for _ in range(n)]


def test_same_seed_same_draws_different_seed_different_draws(rng):
    logits = rng.standard_normal(50)
    seed = int(rng.integers(2**31))
    first = draws(logits, seed)
    assert draws(logits, seed) == first
    assert draws(logits, seed + 1) != first  # 300 draws over ~50 tokens: equal only with probability << 1e-100
    assert draws(logits, seed, topk=10, topp=0.9) == draws(logits, seed, topk=10, topp=0.9)


def test_each_draw_takes_exactly_one_number_from_the_generator(rng):
    logits = rng.standard_normal(40)
    seed = int(rng.integers(2**31))
    ours, mirror = np.random.default_rng(seed), np.random.default_rng(seed)
    for settings in [(1.0, 0, 1.0), (0.7, 5, 0.9), (1.5, 0, 0.3)] * 10:
        sample(logits, *settings, ours)
        mirror.random()
    assert ours.random() == mirror.random()


# --- the candidate set and its probabilities ----------------------------------------------------------------------


@pytest.mark.parametrize("temperature, topk, topp", [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8), (1.0, 8, 0.9),
                                                     (0.5, 3, 0.5), (2.0, 40, 0.95)])
def test_candidate_distribution_matches_the_rule(temperature, topk, topp, rng):
    for _ in range(20):
        logits = np.clip(rng.standard_normal(30), -2.5, 2.5)  # no probability near float rounding (see below)
        ids, probs = candidate_distribution(logits, temperature, topk, topp)
        ref_ids, ref_probs = reference_candidates(logits, temperature, topk, topp)
        assert list(ids) == ref_ids
        np.testing.assert_allclose(probs, ref_probs, rtol=1e-12, atol=1e-15)
        assert np.isclose(probs.sum(), 1.0)


@pytest.mark.parametrize("temperature, topk, topp", [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8), (1.0, 8, 0.9)])
def test_draws_stay_in_the_candidate_set_and_follow_its_probabilities(temperature, topk, topp, rng):
    """20k draws; each candidate's frequency must be within 5 binomial standard deviations of its probability.

    Per candidate a 5-sigma two-sided miss has probability ~6e-7 (normal approximation; n*p is typically >= 50
    here), so with at most 30 candidates and 4 settings a correct sampler fails this test with probability below 1e-4
    per run. A sampler that skipped renormalisation, top-k or top-p, or drew from the wrong cumulative sum, would be
    off by far more.
    """
    n = 20_000
    logits = np.clip(rng.standard_normal(30), -2, 2) * 0.75  # flat enough that every kept token has n * p >= ~40
    ids, probs = candidate_distribution(logits, temperature, topk, topp)
    if topk or topp < 1:  # guard: the truncation removes real mass, so staying inside the set means something
        full = softmax(logits / temperature)
        assert full[np.setdiff1d(np.arange(30), ids)].sum() > 0.05

    generator = np.random.default_rng(rng.integers(2**63))
    counts = np.bincount([sample(logits, temperature, topk, topp, generator) for _ in range(n)], minlength=30)

    outside = np.setdiff1d(np.flatnonzero(counts), ids)
    assert outside.size == 0, f"tokens {outside.tolist()} drawn but not in the candidate set {ids.tolist()}"
    freq = counts[ids] / n
    sigma = np.sqrt(probs * (1 - probs) / n)
    worst = np.max(np.abs(freq - probs) / np.maximum(sigma, 1e-12))
    assert np.all(np.abs(freq - probs) <= 5 * sigma + 1 / n), f"worst deviation {worst:.1f} sigma"


# --- top-p and top-k by hand --------------------------------------------------------------------------------------


P4 = np.log([0.5, 0.3, 0.15, 0.05])


@pytest.mark.parametrize("topp, expected", [(0.3, [0]), (0.49, [0]), (0.79, [0, 1]), (0.81, [0, 1, 2]),
                                            (0.94, [0, 1, 2]), (0.96, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_the_smallest_prefix_reaching_topp(topp, expected):
    ids, probs = candidate_distribution(P4, 1.0, 0, topp)
    assert ids.tolist() == expected
    kept = np.array([0.5, 0.3, 0.15, 0.05])[expected]
    np.testing.assert_allclose(probs, kept / kept.sum(), rtol=1e-12)


def test_top_p_at_an_exact_boundary():
    ids, _ = candidate_distribution(P4, 1.0, 0, 0.8)
    assert ids.tolist() == [0, 1]


def test_top_p_is_applied_to_the_top_k_renormalised_probabilities():
    # top-2 of [0.5, 0.3, 0.15, 0.05] renormalised is [0.625, 0.375]: topp 0.6 keeps only token 0
    ids, probs = candidate_distribution(P4, 1.0, 2, 0.6)
    assert ids.tolist() == [0] and probs.tolist() == [1.0]
    ids, probs = candidate_distribution(P4, 1.0, 2, 0.7)
    assert ids.tolist() == [0, 1]
    np.testing.assert_allclose(probs, [0.625, 0.375], rtol=1e-12)


def test_top_k_ties_go_to_the_lower_ids():
    logits = np.array([0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    ids, probs = candidate_distribution(logits, 1.0, 2, 1.0)
    assert ids.tolist() == [1, 2]
    np.testing.assert_allclose(probs, [0.5, 0.5])


@pytest.mark.parametrize("topk", [2, 40, 4095, 4096, 5000])
def test_top_k_over_a_vocabulary_full_of_ties(topk, rng):
    """The top k are chosen without sorting the whole vocabulary; ties at the k-th place must still go to the lower
    ids, as in a sort of everything (logits rounded to one decimal: every value is shared by ~50 tokens)."""
    logits = np.round(rng.standard_normal(4096), 1)
    ids, probs = candidate_distribution(logits, 1.0, topk, 1.0)
    ref_ids, ref_probs = reference_candidates(logits, 1.0, topk, 1.0)
    assert list(ids) == ref_ids
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-12, atol=1e-15)


def test_top_k_larger_than_the_vocabulary_keeps_everything():
    ids, _ = candidate_distribution(np.array([0.0, 2.0, 1.0]), 1.0, 50, 1.0)
    assert ids.tolist() == [1, 2, 0]


# --- temperature --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.25, 0.5, 1.0, 2.0, 7.0])
def test_temperature_divides_the_logits(temperature, rng):
    # |logits| <= 2, so every probability is >= e^-16 / 12: far above the rounding of a cumulative sum, and topp=1
    # must keep all 12 tokens (see the report: tokens below ~1e-16 can be cut at topp=1)
    logits = np.clip(rng.standard_normal(12), -2, 2) * temperature ** 0.5
    ids, probs = candidate_distribution(logits, temperature, 0, 1.0)
    by_hand = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
    np.testing.assert_allclose(probs, by_hand[ids], rtol=1e-10)
    assert sorted(ids.tolist()) == list(range(12))
    assert ids.tolist() == np.argsort(-by_hand, kind="stable").tolist()  # most likely first


def test_temperature_by_hand():
    # softmax([2, 1, 0] / 2) = e^[1, .5, 0] / (e + e^.5 + 1)
    _, probs = candidate_distribution(np.array([2.0, 1.0, 0.0]), 2.0, 0, 1.0)
    z = math.e + math.exp(0.5) + 1
    np.testing.assert_allclose(probs, [math.e / z, math.exp(0.5) / z, 1 / z], rtol=1e-12)


def test_higher_temperature_flattens_the_distribution(rng):
    logits = rng.standard_normal(20) * 2
    entropies = []
    for t in (0.3, 1.0, 3.0):
        _, p = candidate_distribution(logits, t, 0, 1.0)
        entropies.append(float(-(p * np.log(p)).sum()))
    assert entropies[0] < entropies[1] < entropies[2] < math.log(20)


def test_small_temperature_and_large_logits_stay_finite():
    logits = np.array([1000.0, 999.0, -1000.0], dtype=np.float32)
    ids, probs = candidate_distribution(logits, 1e-3, 0, 1.0)
    assert np.isfinite(probs).all()
    assert ids[0] == 0 and probs[0] == pytest.approx(1.0)
    assert sample(logits, 1e-3, 0, 1.0, np.random.default_rng(0)) == 0


def test_masked_tokens_get_no_probability():
    ids, probs = candidate_distribution(np.array([0.0, -np.inf, 1.0, -np.inf]), 1.0, 0, 1.0)
    assert ids[:2].tolist() == [2, 0]
    np.testing.assert_allclose(probs[:2], softmax([1.0, 0.0]))
    assert probs[2:].sum() == 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_logits_are_an_error_not_token_zero(temperature):
    with pytest.raises(FloatingPointError, match="NaN"):
        sample(np.array([0.5, np.nan, 0.1]), temperature, 0, 1.0, np.random.default_rng(0))
