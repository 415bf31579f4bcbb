"""The sampling transform as it was before it learnt to touch only the top-k survivors.

Kept verbatim for two uses: the "before" of `python -m benchmarks hotpath`, and a second
reference for `protocol.sampling` and the edge's torch path in the tests (same support
bit for bit and the same probabilities to float rounding, on the adversarial rows
below). Full-vocabulary masks, exp and sort: slow, simple. It lives in benchmarks, not
tests, because benchmarks may not import tests (tests/test_layers.py).
"""
from __future__ import annotations

import numpy as np

from protocol.sampling import _TOP_P_PREFILTER, SamplingParams


def greedy_token(logits: np.ndarray) -> int:
    """Argmax with ties to the lowest id (numpy's argmax already does this)."""
    return int(np.argmax(logits))


def probabilities(
    logits: np.ndarray, params: SamplingParams, out: np.ndarray | None = None
) -> np.ndarray:
    """The exact float32 distribution sampled from, for a logits vector or a (n, V) batch.

    `out` (same shape, float32) avoids allocating a vocabulary-sized array per token.
    Greedy gives a one-hot vector at the argmax, which keeps the verification rule
    valid for T = 0 (p/q is then 0 or 1).
    """
    logits = np.asarray(logits)
    if out is None:
        out = np.empty(logits.shape, dtype=np.float32)
    if logits.ndim == 2:
        for row in range(logits.shape[0]):
            probabilities(logits[row], params, out[row])
        return out
    if logits.ndim != 1:
        raise ValueError(f"logits must be 1-D or 2-D, got shape {logits.shape}")

    if params.greedy:
        out.fill(0.0)
        out[greedy_token(logits)] = 1.0
        return out

    np.multiply(logits, np.float32(1.0 / params.temperature), out=out, casting="unsafe")
    if params.top_k and params.top_k < out.size:
        _keep_top_k(out, params.top_k)
    out -= out.max()
    np.exp(out, out=out)  # -inf -> 0 for masked tokens
    out /= out.sum(dtype=np.float64)
    if params.top_p < 1.0:
        _keep_top_p(out, params.top_p)
    return out


def _keep_top_k(scaled: np.ndarray, k: int) -> None:
    """Set all but the k largest entries to -inf, in place; ties go to the lower id."""
    kth = np.partition(scaled, scaled.size - k)[scaled.size - k]
    n_above = int(np.count_nonzero(scaled > kth))
    ties_dropped = np.flatnonzero(scaled == kth)[k - n_above :]
    scaled[scaled < kth] = -np.inf
    scaled[ties_dropped] = -np.inf


def _keep_top_p(probs: np.ndarray, top_p: float) -> None:
    """Keep the smallest prefix (by descending prob, ties to lower id) with mass >= top_p.

    Renormalises in place. A full stable sort of a 49k vocabulary costs milliseconds, so
    only the largest `_TOP_P_PREFILTER` entries are sorted when they provably decide the
    cut: every id at or above the cut value is then among them, in the same order.
    """
    target = top_p * float(probs.sum(dtype=np.float64))
    order = _descending_order(probs, min(probs.size, _TOP_P_PREFILTER))
    cum = np.cumsum(probs[order], dtype=np.float64)
    n_keep = int(np.searchsorted(cum, target, side="left")) + 1
    if order.size < probs.size and (
        n_keep >= order.size or probs[order[n_keep - 1]] <= probs[order[-1]]
    ):
        order = _descending_order(probs, probs.size)
        cum = np.cumsum(probs[order], dtype=np.float64)
        n_keep = int(np.searchsorted(cum, target, side="left")) + 1
    n_keep = min(n_keep, order.size)
    kept = order[:n_keep]
    values = probs[kept] / np.float32(cum[n_keep - 1])
    probs.fill(0.0)
    probs[kept] = values


def _descending_order(probs: np.ndarray, n: int) -> np.ndarray:
    """Ids of the n largest entries in descending order, ties to the lower id."""
    if n >= probs.size:
        return np.lexsort((np.arange(probs.size), -probs))
    cand = np.argpartition(probs, probs.size - n)[probs.size - n :]
    return cand[np.lexsort((cand, -probs[cand]))]


#: Settings the adversarial rows are run under (the default one first).
ADVERSARIAL_SETTINGS = (
    SamplingParams(0.7, top_k=40, top_p=0.95),
    SamplingParams(0.0),
    SamplingParams(1.0),
    SamplingParams(1.0, top_k=1),
    SamplingParams(1.0, top_k=20),
    SamplingParams(0.8, top_p=0.9),
    SamplingParams(1.0, top_k=20, top_p=0.5),
    SamplingParams(1.3, top_k=5, top_p=0.6),
)


def adversarial_rows(v: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Logits rows where a truncating transform is most likely to go wrong."""
    rng = np.random.default_rng(seed)
    rows: dict[str, np.ndarray] = {}
    row = rng.normal(0, 1, v).astype(np.float32) - 10
    row[rng.choice(v, 10, replace=False)] = np.arange(10, 20, dtype=np.float32)
    row[rng.choice(np.flatnonzero(row < 0), 60, replace=False)] = 5.0  # 60 ties across every top-k cut
    rows["ties_at_top_k"] = row
    rows["integer_ties"] = np.round(rng.normal(0, 2, v)).astype(np.float32)
    row = np.full(v, -30.0, np.float32)
    # probabilities 4:2:2:1:1 (ties at every top-p cut of 0.4 / 0.6 / 0.8 / 0.9)
    row[[7, 3, 11, 1, 9]] = np.log(np.array([4, 2, 2, 1, 1], np.float32))
    rows["top_p_cut_on_tie"] = row
    row = np.full(v, -np.inf, np.float32)
    row[v // 3] = 0.0
    rows["one_hot_masked"] = row
    row = np.zeros(v, np.float32)
    row[v - 1] = 200.0
    rows["one_hot_underflow"] = row
    rows["uniform"] = np.zeros(v, np.float32)
    rows["near_uniform"] = rng.normal(0, 1e-6, v).astype(np.float32)
    row = np.full(v, -np.inf, np.float32)
    row[rng.choice(v, 3, replace=False)] = [1.0, 2.0, 2.0]  # fewer finite entries than top-k
    rows["few_finite"] = row
    rows["peaked_normal"] = (rng.normal(0, 4, v)).astype(np.float32)
    return rows
