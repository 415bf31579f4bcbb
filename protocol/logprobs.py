"""The target's log-probabilities of the tokens a request emits (OpenAI's `logprobs`).

What they are: the *raw* log-softmax of the target's logits at each emitted position,
log p_target(token | prefix), before temperature, top-k and top-p. That is what vLLM
reports by default (`logprobs_mode="raw_logprobs"`) and what OpenAI's API reports (its
logprobs do not change with `temperature`), and it is what evaluation harnesses score.
They are the target's, never the draft's: they are computed on the edge, where the
target's logits are, for the committed tokens only, and carried down with the verdict.

Where they come from, per emitted token:
- an accepted draft x_i: row i of the round's forward;
- a bonus / correction token (and edge-only tokens): the row that decided it;
- a token the device resampled after a rejection at j: row j of that round. The edge
  does not know the token when it answers, so it keeps row j's log-softmax (one
  vocabulary-sized float32 row, only for requests that asked for logprobs) and reports
  the token's logprob with the next verdict (the token arrives as the next Draft's
  prefix), or in `Done` when the request ends on it (`End` carries it).

Exactness: the edge computes them in float32 from float32 logits (max-shifted, the sum
of exponentials in float64), the same as `torch.log_softmax` of the target's logits to
float rounding (tests/test_logprobs.py compares with a direct transformers forward).
The top alternatives are the k largest, ties to the lower id.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: No logprobs asked for (the Start default): nothing extra is computed or sent.
OFF = -1
#: Most alternatives per token (OpenAI's top_logprobs limit; vLLM's default cap).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities of n consecutive emitted tokens and, per token, the k best ids."""

    logprob: np.ndarray  # (n,) float32: log p(token)
    top_ids: np.ndarray  # (n, k) int32, by descending logprob (ties: lower id first)
    top_logprobs: np.ndarray  # (n, k) float32

    @property
    def n(self) -> int:
        return int(self.logprob.size)

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[1]) if self.top_ids.ndim == 2 else 0

    @classmethod
    def empty(cls, k: int) -> "TokenLogprobs":
        return cls(np.zeros(0, np.float32), np.zeros((0, k), np.int32), np.zeros((0, k), np.float32))

    @classmethod
    def concat(cls, parts: "list[TokenLogprobs]", k: int) -> "TokenLogprobs":
        parts = [p for p in parts if p.n]
        if not parts:
            return cls.empty(k)
        if len(parts) == 1:
            return parts[0]
        return cls(np.concatenate([p.logprob for p in parts]), np.concatenate([p.top_ids for p in parts]),
                   np.concatenate([p.top_logprobs for p in parts]))

    def entries(self) -> list[tuple[float, list[tuple[int, float]]]]:
        """Per token: (logprob, [(id, logprob) of the k best])."""
        return [(float(self.logprob[i]), list(zip(self.top_ids[i].tolist(), self.top_logprobs[i].tolist())))
                for i in range(self.n)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-softmax of a (V,) row or each row of (n, V) logits (float64 sums)."""
    x = np.asarray(logits, dtype=np.float32)
    top = x.max(axis=-1, keepdims=True)
    shifted = x - top
    lse = np.log(np.exp(shifted).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return shifted - lse


def top_entries(lsm: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (ids, logprobs) of each row of a (n, V) log-softmax, ties to the lower id."""
    n, v = lsm.shape
    k = min(k, v)
    if k == 0:
        return np.zeros((n, 0), np.int32), np.zeros((n, 0), np.float32)
    ids = np.empty((n, k), np.int32)
    for r in range(n):
        row = lsm[r]
        cand = np.argpartition(row, v - k)[v - k :] if k < v else np.arange(v)
        kth = row[cand].min()
        if np.count_nonzero(row == kth) > np.count_nonzero(row[cand] == kth):  # a tie cut through
            cand = np.concatenate([cand[row[cand] > kth], np.flatnonzero(row == kth)])
        ids[r] = cand[np.lexsort((cand, -row[cand]))][:k]
    return ids, np.take_along_axis(lsm, ids.astype(np.int64), axis=1)


def of_rows(lsm: np.ndarray, tokens: np.ndarray, k: int) -> TokenLogprobs:
    """`TokenLogprobs` of tokens[i] under row i of a (n, V) log-softmax."""
    tokens = np.asarray(tokens, dtype=np.int64)
    lp = lsm[np.arange(tokens.size), tokens].astype(np.float32)
    ids, top = top_entries(lsm, k)
    return TokenLogprobs(lp, ids, top.astype(np.float32))


def of_logits(logits: np.ndarray, tokens: np.ndarray, k: int) -> TokenLogprobs:
    """`TokenLogprobs` of tokens[i] under the raw logits row i of (n, V) `logits`."""
    logits = np.asarray(logits)
    if logits.ndim == 1:
        logits = logits[np.newaxis]
    return of_rows(log_softmax(logits), tokens, k)


def as_json(lp: TokenLogprobs) -> dict[str, list]:
    """For `Done`'s JSON (the logprob of a request's last, resampled token); float32
    values survive the float64 round trip exactly."""
    return {"logprob": lp.logprob.tolist(), "top_ids": lp.top_ids.tolist(), "top_logprobs": lp.top_logprobs.tolist()}


def from_json(obj: object, k: int) -> TokenLogprobs:
    """The inverse of `as_json` on untrusted input; raises ValueError on anything else."""
    if not isinstance(obj, dict) or set(obj) != {"logprob", "top_ids", "top_logprobs"}:
        raise ValueError("logprobs must be an object with logprob, top_ids and top_logprobs")
    try:
        lp = np.asarray(obj["logprob"], dtype=np.float32).reshape(-1)
        ids = np.asarray(obj["top_ids"], dtype=np.int64).reshape(lp.size, k)
        top = np.asarray(obj["top_logprobs"], dtype=np.float32).reshape(lp.size, k)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"malformed logprobs: {exc}") from None
    if np.any((ids < -(2**31)) | (ids >= 2**31)):
        raise ValueError("logprobs ids out of range")
    return TokenLogprobs(lp, ids.astype(np.int32), top)
