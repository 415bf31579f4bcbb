"""The sampling transform: logits + settings -> the exact distribution a token is drawn from.

Speculative decoding is lossless only if the device's q and the edge's p come from the
*same* transform of their respective logits, and if q is the distribution the draft
token was really sampled from. This module is therefore the only place in the project
that turns logits into probabilities; both sides import it.

Transform order (same as llama.cpp / transformers defaults): temperature, then top-k on
the scaled logits, then softmax, then top-p (nucleus) on the probabilities. Ties are
broken deterministically toward the lower token id, everywhere, so both sides always
agree on which tokens survive a truncation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: How many of the largest probabilities top-p looks at before paying for a full sort.
_TOP_P_PREFILTER = 1024


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings both sides apply. temperature 0 means greedy (argmax)."""

    temperature: float = 1.0
    top_k: int = 0  # 0 disables top-k
    top_p: float = 1.0  # 1.0 disables top-p

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def truncates(self) -> bool:
        """True when the distribution has a small support (top-k or top-p active)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)


#: Independent random streams per role, derived from the one request seed. The device's
#: draft draws and the edge's acceptance draws must be independent: with one shared
#: stream, u_1 would equal the uniform that drew x_1 and the test would be biased.
DEVICE_STREAM = 0
EDGE_STREAM = 1


def rng_for(seed: int, stream: int) -> np.random.Generator:
    """The seeded generator a role uses for one request (see DEVICE_STREAM / EDGE_STREAM)."""
    return np.random.default_rng([seed, stream])


def resume_seed(seed: int, attempt: int) -> int:
    """The request seed for the `attempt`-th (re)start of a request on the edge.

    Attempt 0 is the seed itself; a resumed request gets an independent derived seed,
    because replaying the edge's stream would reuse uniforms that already decided the
    committed prefix.
    """
    if attempt == 0:
        return seed
    return int(np.random.SeedSequence([seed, attempt]).generate_state(1, np.uint64)[0] >> 1)


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


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one id from a non-negative vector (need not be exactly normalised)."""
    return int(sample_rows(probs[np.newaxis], rng)[0])


def sample_rows(probs: np.ndarray, rng: np.random.Generator, k: int | None = None) -> np.ndarray:
    """Draw one id per row of a (B, V) non-negative array (or k i.i.d. ids per row), by inverse CDF.

    The cumulative sum is float64; the drawn id is the first whose cumulative mass
    exceeds u * total, so a zero-probability id can never be drawn. Returns (B,) ids,
    or (B, k) when k is given.
    """
    cum = np.cumsum(probs, axis=1, dtype=np.float64)
    total = cum[:, -1]
    if not np.all(total > 0.0):
        raise ValueError("cannot sample from an all-zero distribution")
    if k is None:
        threshold = rng.random(cum.shape[0]) * total
        return np.count_nonzero(cum <= threshold[:, np.newaxis], axis=1)
    threshold = rng.random((cum.shape[0], k)) * total[:, np.newaxis]
    return np.stack([np.searchsorted(c, t, side="right") for c, t in zip(cum, threshold)])
