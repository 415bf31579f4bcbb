"""What travels down after a rejection, and how the device turns it into a token.

The edge's verdict on a rejection at j must let the device draw from
norm(max(0, P_j - Q_j)). Encodings (negotiated per request):
- "full": the whole P_j row (the paper's DSSD; |V| float32);
- "support": only P_j's non-zero entries as (id, prob) pairs, exact whenever top-k /
  top-p truncate P_j (the residual is zero outside P_j's support);
- "auto": support when the settings truncate, full otherwise.
"""
from __future__ import annotations

import numpy as np

from protocol import wire
from protocol.sampling import SamplingParams
from protocol.verification import Verdict, device_resample, device_resample_sparse

#: Request modes the edge serves ("device-only" never reaches the edge).
MODES = ("dssd", "dssd-paper", "dsd", "edge-only")
DOWNLINKS = ("auto", "full", "support")


def choose_downlink(mode: str, requested: str, sampling: SamplingParams) -> str:
    """The encoding a request actually uses; the paper's mode always sends the full row."""
    if mode == "dssd-paper":
        return "full"
    if requested == "auto":
        return "support" if sampling.truncates else "full"
    return requested


def encode_rejection(verdict: Verdict, p_row: np.ndarray, downlink: str) -> wire.VerdictMsg:
    """Edge side: the RESAMPLE verdict carrying P_j in the request's encoding."""
    if downlink == "support":
        ids = np.flatnonzero(p_row).astype(np.int32)
        return wire.VerdictMsg(verdict.kind, verdict.n_accepted, p_ids=ids, p_values=p_row[ids])
    return wire.VerdictMsg(verdict.kind, verdict.n_accepted, p_full=p_row.astype(np.float32, copy=True))


def resample_from_verdict(
    msg: wire.VerdictMsg, q_row: np.ndarray, rng: np.random.Generator
) -> int:
    """Device side: draw the replacement token from the residual, whatever the encoding."""
    if msg.p_full is not None:
        if msg.p_full.shape != q_row.shape:
            raise ValueError(f"P_j has {msg.p_full.size} entries, the draft vocabulary {q_row.size}")
        return device_resample(msg.p_full.astype(np.float32), q_row, rng)
    if msg.p_ids is not None:
        if msg.p_ids.size == 0 or msg.p_ids.min() < 0 or msg.p_ids.max() >= q_row.size:
            raise ValueError("P_j support is empty or outside the vocabulary")
        return device_resample_sparse(msg.p_ids, msg.p_values, q_row, rng)
    raise ValueError("a RESAMPLE verdict arrived without P_j")
