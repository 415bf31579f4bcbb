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

#: Smallest temperature other than 0 (greedy). Below it, 1/T scales ordinary logits
#: toward float32 overflow (inf - inf = NaN in the softmax) and the distribution is
#: greedy in all but exact ties anyway; such settings are refused on both sides, which
#: build the same `SamplingParams`, so they can never disagree about them.
MIN_TEMPERATURE = 1e-4


class NonFiniteLogits(ValueError):
    """A logits row holds NaN or +inf, or no finite entry: it defines no distribution.

    -inf alone is allowed: it is how a model masks a token (probability 0). Raised by
    the transform so that each side can turn it into its own clear error instead of
    sampling garbage.
    """


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings both sides apply. temperature 0 means greedy (argmax)."""

    temperature: float = 1.0
    top_k: int = 0  # 0 disables top-k
    top_p: float = 1.0  # 1.0 disables top-p

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if 0.0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature {self.temperature} is below the floor {MIN_TEMPERATURE}; use 0 for greedy"
            )
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


#: Spawn key of the per-choice seeds (`choice_seed`), apart from `resume_seed`'s entropy.
_CHOICE_KEY = 1


def choice_seed(seed: int, index: int) -> int:
    """The request seed of choice `index` of a request with n > 1 choices (OpenAI's `n`).

    Choice 0 keeps the request's seed (n = 1 is unchanged); choice i > 0 gets an
    independent 63-bit seed from numpy's SeedSequence spawned under (seed, i), so the n
    choices are independent samples of the target and reproducible from the one seed.
    """
    if index == 0:
        return seed
    return int(np.random.SeedSequence(seed, spawn_key=(_CHOICE_KEY, index)).generate_state(1, np.uint64)[0] >> 1)


def _check_finite(value: float) -> None:
    """Refuse a row whose largest entry is NaN, +inf or -inf (see `NonFiniteLogits`)."""
    if not np.isfinite(value):
        raise NonFiniteLogits(
            f"the logits row has {'NaN' if np.isnan(value) else value} as its largest entry: "
            "it defines no distribution (the model produced non-finite logits)"
        )


def greedy_token(logits: np.ndarray) -> int:
    """Argmax with ties to the lowest id (numpy's argmax already does this).

    numpy's argmax returns the first NaN when there is one, so checking the winner
    refuses NaN, +inf and an all -inf row at no extra cost.
    """
    token = int(np.argmax(logits))
    _check_finite(logits[token])
    return token


def greedy_tokens(logits: np.ndarray) -> np.ndarray:
    """`greedy_token` for every row of a (n, V) array."""
    tokens = np.argmax(logits, axis=1)
    _check_finite(logits[np.arange(tokens.size), tokens].min(initial=0.0))
    return tokens


def probabilities(
    logits: np.ndarray, params: SamplingParams, out: np.ndarray | None = None
) -> np.ndarray:
    """The exact float32 distribution sampled from, for a logits vector or a (n, V) batch.

    `out` (same shape, float32) avoids allocating a vocabulary-sized array per token.
    Greedy gives a one-hot vector at the argmax, which keeps the verification rule
    valid for T = 0 (p/q is then 0 or 1). Raises `NonFiniteLogits` on NaN / +inf.
    """
    logits = np.asarray(logits)
    if out is None:
        out = np.empty(logits.shape, dtype=np.float32)
    if logits.ndim == 2:
        for row in range(logits.shape[0]):
            _transform(logits[row], params, out[row])
        return out
    if logits.ndim != 1:
        raise ValueError(f"logits must be 1-D or 2-D, got shape {logits.shape}")
    _transform(logits, params, out)
    return out


def draw(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, out: np.ndarray) -> int:
    """Transform one logits row into `out` and draw a token from it; greedy takes the argmax.

    The same token and the same use of `rng` as `sample(probabilities(logits, params,
    out), rng)`, but under top-k the inverse-CDF draw runs over the k survivors only:
    their float64 partial sums in id order are those of the full row (the zeros in
    between add nothing), so the drawn id is identical.
    """
    support = _transform(logits, params, out)
    if params.greedy:
        assert support is not None
        return int(support[0][0])
    if support is None:
        return sample(out, rng)
    ids, values = support
    return int(ids[_inverse_cdf(np.cumsum(values, dtype=np.float64), rng)])


def _transform(
    logits: np.ndarray, params: SamplingParams, out: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Write the distribution of one row into `out`; return its support (ids ascending,
    values) when it is known without a scan (greedy, top-k), else None."""
    if params.greedy:
        token = greedy_token(logits)
        out.fill(0.0)
        out[token] = 1.0
        return np.array([token]), np.ones(1, np.float32)
    scale(logits, params, out)
    if params.top_k and params.top_k < out.size:
        ids, values = top_k_probabilities(out, params.top_k, params.top_p)
        out.fill(0.0)
        out[ids] = values
        return ids, values
    top = out.max()
    _check_finite(top)
    out -= top
    np.exp(out, out=out)  # -inf -> 0 for masked tokens
    out /= out.sum(dtype=np.float64)
    if params.top_p < 1.0:
        _keep_top_p(out, params.top_p)
    return None


def scale(logits: np.ndarray, params: SamplingParams, out: np.ndarray | None = None) -> np.ndarray:
    """The temperature step: float32 logits times float32(1 / T) (not greedy)."""
    return np.multiply(logits, np.float32(1.0 / params.temperature), out=out, casting="unsafe")


def top_k_probabilities(scaled: np.ndarray, k: int, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (ties to the lower id), softmax and top-p of a scaled row, touching the
    vocabulary only to select the k survivors and to count ties at the k-th value.

    Returns the survivors' positions in ascending order and their float32 probabilities
    (0 for a survivor at -inf). numpy's partition puts NaN and +inf among the k largest,
    so checking the survivors' maximum checks the whole row. `scaled` may also be a
    subset of a row, in id order, that provably holds every entry at or above the
    row's k-th value (the edge's torch path selects such candidates on its device).
    """
    n = scaled.size
    ids = np.argpartition(scaled, n - k)[n - k :]
    z = scaled[ids]
    top = z.max()
    _check_finite(top)
    kth = z.min()
    if np.count_nonzero(scaled == kth) > np.count_nonzero(z == kth):
        # the partition cut through a tie: keep the lowest ids of the tied value
        above = ids[z > kth]
        ids = np.concatenate([above, np.flatnonzero(scaled == kth)[: k - above.size]])
    ids.sort()
    z = scaled[ids] - top
    np.exp(z, out=z)
    z /= z.sum(dtype=np.float64)
    if top_p < 1.0:
        target = top_p * float(z.sum(dtype=np.float64))
        order = np.argsort(-z, kind="stable")  # ids ascending: ties go to the lower id
        cum = np.cumsum(z[order], dtype=np.float64)
        n_keep = min(int(np.searchsorted(cum, target, side="left")) + 1, order.size)
        kept = np.sort(order[:n_keep])
        ids, z = ids[kept], z[kept] / np.float32(cum[n_keep - 1])
    return ids, z


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
        if cum.shape[0] == 1:
            return np.array([_inverse_cdf(cum[0], rng)])
        threshold = rng.random(cum.shape[0]) * total
        return np.count_nonzero(cum <= threshold[:, np.newaxis], axis=1)
    threshold = rng.random((cum.shape[0], k)) * total[:, np.newaxis]
    return np.stack([np.searchsorted(c, t, side="right") for c, t in zip(cum, threshold)])


def _inverse_cdf(cum: np.ndarray, rng: np.random.Generator) -> int:
    """Index of the first entry of a float64 cumulative sum exceeding u * total: one draw,
    consuming rng exactly as one row of `sample_rows` does."""
    total = cum[-1]
    if not total > 0.0:
        raise ValueError("cannot sample from an all-zero distribution")
    pick = int(np.searchsorted(cum, rng.random(1)[0] * total, side="right"))
    # u * total can round up to total: stay on the last id with mass
    return min(pick, int(np.searchsorted(cum, total, side="left")))
