"""The sampling transform against an independent, deliberately naive reference."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from protocol.sampling import SamplingParams, probabilities, sample


def reference_probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Plain-Python transform: temperature, top-k, softmax, top-p; ties to the lower id."""
    v = len(logits)
    if params.temperature == 0:
        out = np.zeros(v)
        out[max(range(v), key=lambda i: (logits[i], -i))] = 1.0
        return out
    z = [float(x) / params.temperature for x in logits]
    order = sorted(range(v), key=lambda i: (-z[i], i))
    keep = set(order[: params.top_k] if params.top_k else order)
    m = max(z[i] for i in keep)
    e = {i: np.exp(z[i] - m) for i in keep}
    s = sum(e.values())
    p = {i: e[i] / s for i in keep}
    if params.top_p < 1.0:
        kept, cum = [], 0.0
        for i in sorted(keep, key=lambda i: (-p[i], i)):
            kept.append(i)
            cum += p[i]
            if cum >= params.top_p:
                break
        s = sum(p[i] for i in kept)
        p = {i: p[i] / s for i in kept}
    out = np.zeros(v)
    for i, x in p.items():
        out[i] = x
    return out


SETTINGS = [
    SamplingParams(0.0),
    SamplingParams(1.0),
    SamplingParams(0.7),
    SamplingParams(1.3, top_k=5),
    SamplingParams(1.0, top_k=1),
    SamplingParams(0.8, top_p=0.9),
    SamplingParams(1.0, top_k=20, top_p=0.5),
    SamplingParams(0.7, top_p=0.05),
]


@pytest.mark.parametrize("params", SETTINGS, ids=str)
@pytest.mark.parametrize("ties", [False, True])
def test_matches_reference(params: SamplingParams, ties: bool) -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        logits = rng.normal(0, 3, 64).astype(np.float32)
        if ties:  # integer logits: many exact ties, including at the top-k / top-p cut
            logits = np.round(logits / 2).astype(np.float32)
        got = probabilities(logits, params)
        want = reference_probabilities(logits, params)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=2e-6)
        assert np.array_equal(got > 0, want > 0), "support differs"


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
def test_top_p_prefilter_on_large_vocab(top_p: float) -> None:
    """Above the prefilter size the fast path must agree with a full stable sort."""
    rng = np.random.default_rng(2)
    params = SamplingParams(1.0, top_p=top_p)
    for scale in (0.5, 3.0, 8.0):
        logits = np.round(rng.normal(0, scale, 5000)).astype(np.float32)
        got = probabilities(logits, params)
        want = reference_probabilities(logits, params)
        assert np.array_equal(got > 0, want > 0)
        np.testing.assert_allclose(got, want, atol=2e-6)


def test_batch_equals_rows_and_out_is_reused() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 100)).astype(np.float32)
    params = SamplingParams(0.9, top_k=10, top_p=0.8)
    out = np.empty_like(logits)
    res = probabilities(logits, params, out=out)
    assert res is out
    for i in range(4):
        np.testing.assert_array_equal(out[i], probabilities(logits[i], params))


def test_greedy_ties_go_to_lowest_id() -> None:
    p = probabilities(np.array([1, 5, 5, 2], np.float32), SamplingParams(0.0))
    assert p.tolist() == [0, 1, 0, 0]


def test_invalid_params_are_refused() -> None:
    for kwargs in ({"temperature": -1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5},
                   {"temperature": float("nan")}):
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)


def test_sample_frequencies_and_zero_mass() -> None:
    rng = np.random.default_rng(4)
    probs = np.array([0.0, 0.5, 0.0, 0.3, 0.2, 0.0], np.float32)
    draws = np.array([sample(probs, rng) for _ in range(40_000)])
    counts = np.bincount(draws, minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    assert stats.chisquare(counts[[1, 3, 4]], 40_000 * probs[[1, 3, 4]]).pvalue > 1e-3
    with pytest.raises(ValueError):
        sample(np.zeros(3, np.float32), rng)


# -- the fast transform against the previous implementation, on adversarial rows ----------

from protocol.sampling import MIN_TEMPERATURE, NonFiniteLogits, draw, greedy_tokens  # noqa: E402
from benchmarks import sampling_before as old  # noqa: E402


@pytest.mark.parametrize("v", [1000, 262_144])
@pytest.mark.parametrize("params", old.ADVERSARIAL_SETTINGS, ids=str)
def test_adversarial_rows_match_previous_implementation(v: int, params: SamplingParams) -> None:
    """Same support bit for bit, same probabilities to float rounding, same draws."""
    for name, logits in old.adversarial_rows(v).items():
        got = probabilities(logits, params)
        want = old.probabilities(logits, params)
        assert np.array_equal(got > 0, want > 0), f"{name}: support differs"
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9, err_msg=name)
        out = np.empty(v, np.float32)
        r_new, r_old = np.random.default_rng(3), np.random.default_rng(3)
        drawn = [draw(logits, params, r_new, out) for _ in range(5)]
        ref = [old.greedy_token(logits) if params.greedy else sample(want, r_old) for _ in range(5)]
        assert drawn == ref, name
        np.testing.assert_array_equal(out, got)


def test_top_k_tie_break_keeps_lowest_ids() -> None:
    logits = old.adversarial_rows(1000)["ties_at_top_k"]
    p = probabilities(logits, SamplingParams(1.0, top_k=20))
    tied = np.flatnonzero(logits == 5.0)
    assert np.count_nonzero(p) == 20
    assert np.array_equal(np.flatnonzero(p[tied]), np.arange(10))  # the 10 lowest tied ids


def test_top_p_cut_on_a_tie_keeps_the_lower_id() -> None:
    logits = old.adversarial_rows(1000)["top_p_cut_on_tie"]
    for k in (0, 40):
        p = probabilities(logits, SamplingParams(1.0, top_k=k, top_p=0.5))
        assert np.flatnonzero(p).tolist() == [3, 7]  # 0.4 + the tied 0.2 with the lower id (3, not 11)


def test_temperature_floor() -> None:
    with pytest.raises(ValueError, match="greedy"):
        SamplingParams(MIN_TEMPERATURE / 2)
    SamplingParams(MIN_TEMPERATURE)
    SamplingParams(0.0)


@pytest.mark.parametrize("params", [SamplingParams(0.0), SamplingParams(1.0), SamplingParams(0.7, 40, 0.95),
                                    SamplingParams(1.0, top_p=0.9)], ids=str)
def test_non_finite_logits_are_refused(params: SamplingParams) -> None:
    rng = np.random.default_rng(0)
    for bad in (np.nan, np.inf):
        logits = rng.normal(size=500).astype(np.float32)
        logits[123] = bad
        with pytest.raises(NonFiniteLogits):
            probabilities(logits, params)
        with pytest.raises(NonFiniteLogits):
            probabilities(np.stack([logits, logits]), params)
    with pytest.raises(NonFiniteLogits):
        probabilities(np.full(500, -np.inf, np.float32), params)
    with pytest.raises(NonFiniteLogits):
        greedy_tokens(np.array([[0.0, 1.0], [np.nan, 0.0]], np.float32))
    masked = np.full(500, -np.inf, np.float32)
    masked[[4, 9]] = [0.0, 1.0]
    assert np.flatnonzero(probabilities(masked, params)).tolist() == ([9] if params.greedy else [4, 9])
