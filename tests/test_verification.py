"""Exactness of the verification math: emitted tokens must be distributed as the target.

Harness: a context-free synthetic "model" whose target/draft distributions depend only
on the position t (P_t, Q_t). Rounds of speculative decoding run through the product's
own batched functions (edge_verify_batch + device_resample_batch, dsd_verify_batch)
for 200k independent sequences until each has 2 tokens; the joint law of (y_1, y_2)
must then be P_1 x P_2. Chi-square with a fixed seed; the same harness must reject the
paper's reversed ratio and a residual computed from logits.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
from scipy import stats

from protocol import verification
from protocol.sampling import SamplingParams, probabilities, sample_rows
from protocol.verification import (
    VerdictKind,
    device_resample,
    device_resample_batch,
    device_resample_sparse,
    candidate_resample_batch,
    draw_candidates_batch,
    dsd_verify,
    dsd_verify_batch,
    edge_verify,
    edge_verify_batch,
    greedy_verify,
)

N_TRIALS = 200_000
GAMMA = 3
N_TOKENS = 2
# p-value threshold. About 60 chi-square tests run here, so 1e-4 keeps the chance of a
# false alarm below 1% for the whole file, while every wrong rule tested scores < 1e-12.
P_MIN = 1e-4


def _draft(Q: np.ndarray, t: int, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """B drafts of GAMMA tokens from positions t.., and their q(x) values."""
    ids = np.stack(
        [sample_rows(np.broadcast_to(Q[t + i], (batch, Q.shape[1])), rng) for i in range(GAMMA)],
        axis=1,
    )
    return ids, Q[np.arange(t, t + GAMMA), ids]


def dssd_round(P, Q, t, batch, rng, resample: Callable = device_resample_batch):
    """One DSSD round for B trials at position t: returns (drafts, n_accepted, next tokens)."""
    ids, q = _draft(Q, t, batch, rng)
    rows = np.broadcast_to(P[t : t + GAMMA + 1], (batch, GAMMA + 1, P.shape[1]))
    v = edge_verify_batch(rows, ids, q, rng)
    tokens = v.token.copy()
    rej = np.flatnonzero(v.kind == VerdictKind.RESAMPLE)
    if rej.size:
        j = t + v.n_accepted[rej]
        tokens[rej] = resample(P[j], Q[j], rng)
    return ids, v.n_accepted, tokens


def dsd_round(P, Q, t, batch, rng):
    ids, _ = _draft(Q, t, batch, rng)
    rows = np.broadcast_to(P[t : t + GAMMA + 1], (batch, GAMMA + 1, P.shape[1]))
    qrows = np.broadcast_to(Q[t : t + GAMMA], (batch, GAMMA, Q.shape[1]))
    v = dsd_verify_batch(rows, qrows, ids, rng)
    assert np.all(v.token >= 0)
    return ids, v.n_accepted, v.token


def generate(P, Q, rng, round_fn: Callable = dssd_round, **opts) -> np.ndarray:
    """Run rounds for N_TRIALS independent sequences until each has N_TOKENS tokens."""
    out = np.full((N_TRIALS, N_TOKENS), -1, np.int64)
    n_out = np.zeros(N_TRIALS, np.int64)
    for t in range(N_TOKENS):  # sequences still at length t run a round from position t
        idx = np.flatnonzero(n_out == t)
        if not idx.size:
            continue
        ids, n_acc, tokens = round_fn(P, Q, t, idx.size, rng, **opts)
        seq = np.concatenate([ids, np.full((idx.size, 1), -1)], axis=1)
        seq[np.arange(idx.size), n_acc] = tokens
        for k in range(N_TOKENS - t):
            emit = k <= n_acc
            out[idx[emit], t + k] = seq[emit, k]
        n_out[idx] = np.minimum(N_TOKENS, t + n_acc + 1)
    assert np.all(out >= 0)
    return out


def joint_pvalue(P: np.ndarray, Q: np.ndarray, round_fn: Callable = dssd_round, seed: int = 0,
                 **opts) -> float:
    """Chi-square p-value of the observed (y1, y2) pairs against P_1 x P_2.

    Any emitted pair outside the support of P_1 x P_2 gives p = 0 outright.
    """
    v = P.shape[1]
    out = generate(P, Q, np.random.default_rng(seed), round_fn, **opts)
    counts = np.bincount(out[:, 0] * v + out[:, 1], minlength=v * v)
    expected = np.outer(P[0], P[1]).ravel().astype(np.float64)
    expected *= N_TRIALS / expected.sum()
    if counts[expected == 0].sum():
        return 0.0
    live = expected > 0
    if live.sum() == 1:  # a one-hot target: every trial landed on the only allowed pair
        return 1.0
    return float(stats.chisquare(counts[live], expected[live]).pvalue)


def _rows(rng: np.random.Generator, v: int, n: int, conc: float = 1.0) -> np.ndarray:
    return rng.dirichlet(np.full(v, conc), size=n).astype(np.float32)


def _shapes() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Target/draft row pairs for positions 1..N_TOKENS + GAMMA, in several regimes."""
    rng = np.random.default_rng(123)
    n = N_TOKENS + GAMMA + 1
    shapes = {}
    shapes["random_v8"] = (_rows(rng, 8, n), _rows(rng, 8, n))
    P = _rows(rng, 12, n)
    shapes["close_tv_small"] = (P, (0.9 * P + 0.1 * _rows(rng, 12, n)).astype(np.float32))
    P = np.zeros((n, 10), np.float32)
    Q = np.zeros((n, 10), np.float32)
    P[:, :5] = _rows(rng, 5, n)
    Q[:, 5:] = _rows(rng, 5, n)
    shapes["disjoint_support"] = (P, Q)
    P = _rows(rng, 9, n)
    shapes["p_equals_q"] = (P, P.copy())
    P = np.zeros((n, 6), np.float32)
    P[:, 2] = 1.0
    shapes["target_one_hot"] = (P, _rows(rng, 6, n))
    return shapes


SHAPES = _shapes()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_dssd_split_verification_is_exact(shape: str) -> None:
    P, Q = SHAPES[shape]
    assert joint_pvalue(P, Q) > P_MIN


@pytest.mark.parametrize("shape", list(SHAPES))
def test_dsd_verification_is_exact(shape: str) -> None:
    P, Q = SHAPES[shape]
    assert joint_pvalue(P, Q, dsd_round) > P_MIN


def test_reversed_ratio_from_the_paper_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """min(1, q/p) as printed in the paper is not exact, and the harness sees it."""
    monkeypatch.setattr(verification, "accept_mask", lambda p, q, u: u * p <= q)
    P, Q = SHAPES["random_v8"]
    assert joint_pvalue(P, Q) < 1e-12


def test_residual_from_logits_fails() -> None:
    """The paper's code subtracts draft logits from target probabilities: wrong law."""

    def logit_residual(p_rows: np.ndarray, q_rows: np.ndarray, rng: np.random.Generator):
        return device_resample_batch(p_rows, np.log(q_rows + 1e-9).astype(np.float32), rng)

    P, Q = SHAPES["random_v8"]
    assert joint_pvalue(P, Q, resample=logit_residual) < 1e-12


def test_no_max_zero_in_residual_fails() -> None:
    """Sampling from P - Q clipped elsewhere (e.g. |P - Q|) is also caught."""

    def abs_residual(p_rows: np.ndarray, q_rows: np.ndarray, rng: np.random.Generator):
        return sample_rows(np.abs(p_rows - q_rows), rng)

    P, Q = SHAPES["random_v8"]
    assert joint_pvalue(P, Q, resample=abs_residual) < 1e-12


SETTINGS = [
    SamplingParams(1.0),
    SamplingParams(0.7),
    SamplingParams(1.0, top_k=3),
    SamplingParams(0.7, top_p=0.8),
    SamplingParams(1.2, top_k=5, top_p=0.9),
]


@pytest.mark.parametrize("params", SETTINGS, ids=str)
def test_exact_under_each_sampling_setting(params: SamplingParams) -> None:
    """P and Q come from logits through the shared transform, as in the product."""
    rng = np.random.default_rng(7)
    n, v = N_TOKENS + GAMMA + 1, 10
    lp = rng.normal(0, 2, (n, v)).astype(np.float32)
    lq = (lp + rng.normal(0, 1.5, (n, v))).astype(np.float32)
    P, Q = probabilities(lp, params), probabilities(lq, params)
    assert joint_pvalue(P, Q) > P_MIN


def test_greedy_emits_the_target_argmax_path() -> None:
    """T = 0: accepted prefix and correction are exactly the target's argmax path."""
    rng = np.random.default_rng(9)
    greedy = SamplingParams(0.0)
    for _ in range(2000):
        gamma = int(rng.integers(0, 6))
        lp = rng.normal(size=(gamma + 1, 20)).astype(np.float32)
        target = lp.argmax(axis=1)
        draft = target[:gamma].copy()
        cut = int(rng.integers(0, gamma + 1))
        if cut < gamma:  # a wrong draft at `cut`, anything after it
            draft[cut] = (draft[cut] + 1 + rng.integers(0, 19)) % 20
            draft[cut + 1 :] = rng.integers(0, 20, gamma - cut - 1)
        v = greedy_verify(target, draft)
        assert v.n_accepted == cut
        assert v.token == target[cut]
        assert v.kind is (VerdictKind.BONUS if cut == gamma else VerdictKind.CORRECTION)
        # the one-hot transform run through the sampled rule agrees (p/q is 0 or 1)
        P = probabilities(lp, greedy)
        if cut == gamma:
            sv = edge_verify(P, draft, np.ones(gamma, np.float32), rng)
            assert (sv.kind, sv.n_accepted, sv.token) == (VerdictKind.BONUS, gamma, target[gamma])


def test_invalid_inputs_are_refused() -> None:
    rng = np.random.default_rng(0)
    P = _rows(rng, 5, 3)
    with pytest.raises(ValueError):
        edge_verify(P, np.array([0, 1]), np.array([0.0, 0.5], np.float32), rng)  # q = 0
    with pytest.raises(ValueError):
        edge_verify(P, np.array([0, 1]), np.array([np.nan, 0.5], np.float32), rng)
    with pytest.raises(ValueError):
        edge_verify(P, np.array([0, 9]), np.array([0.5, 0.5], np.float32), rng)  # id >= V
    with pytest.raises(ValueError):
        edge_verify(P, np.array([0]), np.array([0.5], np.float32), rng)  # rows != gamma + 1


def test_residual_with_no_mass_falls_back_to_target() -> None:
    rng = np.random.default_rng(0)
    p = np.array([0.25, 0.75, 0.0], np.float32)
    draws = [device_resample(p, p.copy(), rng) for _ in range(4000)]
    counts = np.bincount(draws, minlength=3)
    assert counts[2] == 0 and 800 < counts[0] < 1200


def test_single_round_views_agree_with_batch() -> None:
    """The per-round functions the product calls are the batch rule at B = 1."""
    P, Q = SHAPES["random_v8"]
    ids = np.array([1, 4, 2])
    q = Q[np.arange(3), ids]
    for seed in range(50):
        single = edge_verify(P[:4], ids, q, np.random.default_rng(seed))
        batch = edge_verify_batch(P[None, :4], ids[None], q[None], np.random.default_rng(seed))
        assert single == batch.item(0)
        assert dsd_verify(P[:4], Q[:3], ids, np.random.default_rng(seed)) == dsd_verify_batch(
            P[None, :4], Q[None, :3], ids[None], np.random.default_rng(seed)
        ).item(0)


def test_sparse_resample_matches_dense() -> None:
    """Support-only P_j gives the same residual law as the full row."""
    rng = np.random.default_rng(5)
    p = probabilities(rng.normal(0, 2, 30).astype(np.float32), SamplingParams(1.0, top_k=6))
    q = probabilities(rng.normal(0, 2, 30).astype(np.float32), SamplingParams(1.0, top_k=6))
    support = np.flatnonzero(p)
    n = 50_000
    sparse = [device_resample_sparse(support, p[support], q, rng) for _ in range(n)]
    residual = np.maximum(p - q, 0).astype(np.float64)
    counts = np.bincount(sparse, minlength=30)
    live = residual > 0
    assert counts[~live].sum() == 0
    assert stats.chisquare(counts[live], residual[live] / residual.sum() * n).pvalue > P_MIN


def candidate_rows(k: int, rounds: int = 2) -> Callable:
    """The device's candidate residual sampling as the product runs it: up to `rounds`
    batches of k candidates drawn on the edge, then the full-row fallback."""

    def resample(p_rows: np.ndarray, q_rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = np.full(p_rows.shape[0], -1, np.int64)
        todo = np.arange(p_rows.shape[0])
        for _ in range(rounds):
            ids, probs = draw_candidates_batch(p_rows[todo], k, rng)
            out[todo] = candidate_resample_batch(ids, probs, q_rows[todo], rng)
            todo = todo[out[todo] < 0]
            if not todo.size:
                return out
        out[todo] = device_resample_batch(p_rows[todo], q_rows[todo], rng)
        return out

    return resample


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("k", [1, 4])
def test_candidate_downlink_is_exact(shape: str, k: int) -> None:
    P, Q = SHAPES[shape]
    assert joint_pvalue(P, Q, resample=candidate_rows(k)) > P_MIN


@pytest.mark.parametrize("params", SETTINGS, ids=str)
def test_candidate_downlink_exact_under_each_setting(params: SamplingParams) -> None:
    rng = np.random.default_rng(11)
    n, v = N_TOKENS + GAMMA + 1, 10
    lp = rng.normal(0, 2, (n, v)).astype(np.float32)
    for noise in (0.3, 3.0):  # close (small total variation) and far apart
        lq = (lp + rng.normal(0, noise, (n, v))).astype(np.float32)
        P, Q = probabilities(lp, params), probabilities(lq, params)
        assert joint_pvalue(P, Q, resample=candidate_rows(2)) > P_MIN


def test_candidates_accepted_without_the_residual_test_fail() -> None:
    """Taking the first candidate as is (a draw from P, not the residual) is caught."""

    def first_candidate(p_rows, q_rows, rng):  # noqa: ANN001, ANN202
        return draw_candidates_batch(p_rows, 1, rng)[0][:, 0]

    P, Q = SHAPES["random_v8"]
    assert joint_pvalue(P, Q, resample=first_candidate) < 1e-12


def test_candidate_budget_adapts_k() -> None:
    from protocol.downlink import CandidateBudget

    b = CandidateBudget()
    for _ in range(50):
        b.observe(1)
    small = b.k
    for _ in range(50):
        b.observe(12)
    assert small == b.k_min and b.k > 2 * small
