"""What travels down after a rejection, and how the device turns it into a token.

The edge's verdict on a rejection at j must let the device draw from
norm(max(0, P_j - Q_j)). Encodings (negotiated per request, all exact):
- "full": the whole P_j row (the paper's DSSD; |V| float32);
- "support": only P_j's non-zero entries as (id, prob) pairs, exact whenever P_j is
  truncated (the residual is zero outside P_j's support);
- "candidates": K i.i.d. draws from P_j with their probabilities (candidate residual
  sampling); the device may ask for more (`More`), or for the full row;
- "auto": per rejection, the support when it has at most K entries, else candidates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from protocol import wire
from protocol.sampling import SamplingParams
from protocol.verification import (
    Verdict,
    VerdictKind,
    candidate_resample,
    device_resample,
    device_resample_sparse,
)

#: Downlink encodings a request may ask for (module docstring); the one list of them.
DOWNLINKS = ("auto", "full", "support", "candidates")
#: Candidates sent when the device did not say how many it wants.
DEFAULT_CANDIDATES = 4
#: Largest candidate batch (8 bytes each); beyond it the full row is asked for instead.
MAX_CANDIDATES = 4096
#: `More` requests the edge answers for one rejection. A device that follows
#: `next_request_size` (4x more each time, then the full row) sends at most
#: log4(MAX_CANDIDATES) + 1 = 7 of them from one candidate; more is a flood (LIMIT).
MAX_MORE_PER_ROUND = 8


@dataclass(frozen=True)
class RowSupport:
    """A probability row as its non-zero entries (ids ascending, float32 values).

    What a truncated P_j really is: the edge's torch path hands rejections over in this
    form (k entries instead of |V|), and the candidates are drawn over it.
    """

    ids: np.ndarray  # (n,) int64, ascending
    values: np.ndarray  # (n,) float32, > 0
    n_vocab: int

    @classmethod
    def of(cls, row: np.ndarray) -> "RowSupport":
        ids = np.flatnonzero(row)
        return cls(ids, row[ids].astype(np.float32, copy=False), row.size)

    def dense(self, width: int | None = None) -> np.ndarray:
        """The full row; `width` (>= n_vocab) zero-pads it to another model's row count."""
        row = np.zeros(self.n_vocab if width is None else width, np.float32)
        row[self.ids] = self.values
        return row

    def draw(self, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """k i.i.d. draws with their probabilities: the ids and the use of `rng` of
        `draw_candidates(self.dense(), k, rng)` (same float64 partial sums in id order)."""
        cum = np.cumsum(self.values, dtype=np.float64)
        if not (cum.size and cum[-1] > 0.0):
            raise ValueError("cannot sample from an all-zero distribution")
        pick = np.searchsorted(cum, rng.random((1, k))[0] * cum[-1], side="right")
        pick = np.minimum(pick, cum.size - 1)  # u * total can round up to total
        return self.ids[pick], self.values[pick]


def choose_downlink(mode: str, requested: str, sampling: SamplingParams) -> str:
    """The encoding policy a request uses; the paper's mode always sends the full row."""
    if mode == "dssd-paper":
        return "full"
    if requested == "support" and not sampling.truncates:
        return "auto"  # the support of an untruncated P_j is the whole vocabulary
    return requested


def encode_rejection(
    verdict: Verdict, p_row: np.ndarray | RowSupport, policy: str, k: int, rng: np.random.Generator,
    *, width: int | None = None,
) -> wire.VerdictMsg:
    """Edge side: the RESAMPLE verdict carrying P_j (or candidates from it) per the policy.

    `p_row` is the dense row or its `RowSupport`; the message is the same either way.
    `width`: the device's row count, when P_j covers fewer ids (the shared real tokens of
    `protocol.vocab`): a full row is zero-padded to it, the device's padding ids having P = 0.
    """
    j = verdict.n_accepted
    k = min(max(k or DEFAULT_CANDIDATES, 1), MAX_CANDIDATES)
    if policy == "full":
        support = p_row if isinstance(p_row, RowSupport) else None
        if support is not None:
            dense = support.dense(width)
        elif width is None or width == p_row.size:
            dense = p_row.astype(np.float32, copy=True)
        else:
            dense = np.zeros(width, np.float32)
            dense[: p_row.size] = p_row
        return wire.VerdictMsg(VerdictKind.RESAMPLE, j, p_full=dense)
    support = as_support(p_row)
    if policy == "support" or (policy == "auto" and support.ids.size <= k):
        return wire.VerdictMsg(VerdictKind.RESAMPLE, j, p_ids=support.ids.astype(np.int32), p_values=support.values)
    return candidates_message(j, support, k, rng)


def as_support(p_row: np.ndarray | RowSupport) -> RowSupport:
    return p_row if isinstance(p_row, RowSupport) else RowSupport.of(p_row)


def next_request_size(previous: int, n_vocab: int) -> int:
    """Candidates to ask for after `previous` all failed: 4x more, or 0 (the full P_j)
    once a batch would cost as much as the row itself (8 vs 4 bytes per entry)."""
    want = previous * 4
    return 0 if want > MAX_CANDIDATES or 8 * want >= 4 * n_vocab else want


def candidates_message(
    j: int, p_row: np.ndarray | RowSupport, k: int, rng: np.random.Generator
) -> wire.VerdictMsg:
    ids, probs = as_support(p_row).draw(k, rng)
    return wire.VerdictMsg(VerdictKind.RESAMPLE, j, p_ids=ids.astype(np.int32), p_values=probs, candidates=True)


def resample_from_verdict(msg: wire.VerdictMsg, q_row: np.ndarray, rng: np.random.Generator) -> int | None:
    """Device side: the replacement token, or None when all candidates failed (send `More`)."""
    if msg.p_full is not None:
        if msg.p_full.shape != q_row.shape:
            raise ValueError(f"P_j has {msg.p_full.size} entries, the draft vocabulary {q_row.size}")
        return device_resample(msg.p_full.astype(np.float32), q_row, rng)
    if msg.p_ids is None:
        raise ValueError("a RESAMPLE verdict arrived without P_j")
    if msg.p_ids.size == 0 or msg.p_ids.min() < 0 or msg.p_ids.max() >= q_row.size:
        raise ValueError("P_j entries are empty or outside the vocabulary")
    if not np.all(np.isfinite(msg.p_values) & (msg.p_values > 0) & (msg.p_values <= 1.0 + 1e-6)):
        raise ValueError("P_j values must lie in (0, 1]")
    if msg.candidates:
        return candidate_resample(msg.p_ids, msg.p_values, q_row, rng)
    return device_resample_sparse(msg.p_ids, msg.p_values, q_row, rng)


@dataclass
class CandidateBudget:
    """Device-side choice of K, the candidates to ask for, from the trials rejections needed.

    Trials until success are geometric with success probability TV(P_j, Q_j); K is set so
    that about `miss_rate` of rejections need a second trip (`More`), from a decayed mean
    of the observed trial counts.
    """

    k: int = DEFAULT_CANDIDATES
    mean_trials: float = 2.0
    decay: float = 0.9
    miss_rate: float = 0.1
    k_min: int = 2
    k_max: int = 32

    def observe(self, trials: int) -> None:
        self.mean_trials = self.decay * self.mean_trials + (1 - self.decay) * max(trials, 1)
        success = min(1.0 / self.mean_trials, 0.999)
        k = math.ceil(math.log(self.miss_rate) / math.log(1.0 - success))
        self.k = min(max(k, self.k_min), self.k_max)
