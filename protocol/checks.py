"""What a device checks in the edge's frames before acting on them.

`protocol.wire` guarantees a frame is well formed; these checks guarantee it makes sense
for the request the device is running: ids inside its vocabulary (never an out-of-range
id handed to llama.cpp), counts no larger than what it asked for, a verdict kind that fits
the round, limits within sane bounds. Each failure raises `wire.Malformed` with a message
that says what the edge sent, so a broken or hostile edge is a clear protocol error.
"""
from __future__ import annotations

import numpy as np

from protocol import wire
from protocol.downlink import DOWNLINKS
from protocol.logprobs import TokenLogprobs
from protocol.verification import VerdictKind

#: Upper bounds on Welcome fields (a u8 gamma on the wire; int32 positions).
MAX_WELCOME_GAMMA = 255
MAX_WELCOME_CONTEXT = 2**31 - 1
MAX_EOS_IDS = 64
MAX_MODEL_NAME = 1024
MAX_REPLICA_ID = 256


def _bad(what: str) -> wire.Malformed:
    return wire.Malformed(f"the edge sent an invalid {what}")


def check_welcome(w: wire.Welcome, hello: wire.Hello) -> None:
    """The Welcome answers this Hello: same vocabulary, limits within bounds, known downlinks."""
    if w.vocab_fingerprint != hello.vocab_fingerprint or w.n_vocab != hello.n_vocab:
        raise _bad(f"Welcome: its vocabulary ({w.vocab_fingerprint}, {w.n_vocab} ids) is not this device's "
                   f"({hello.vocab_fingerprint}, {hello.n_vocab} ids)")
    if not 0 <= w.max_gamma <= MAX_WELCOME_GAMMA:
        raise _bad(f"Welcome: max_gamma {w.max_gamma} outside [0, {MAX_WELCOME_GAMMA}]")
    if not 1 <= w.max_context <= MAX_WELCOME_CONTEXT or not 1 <= w.max_new_tokens <= MAX_WELCOME_CONTEXT:
        raise _bad(f"Welcome: max_context {w.max_context} / max_new_tokens {w.max_new_tokens} out of range")
    if len(w.eos_token_ids) > MAX_EOS_IDS or any(not 0 <= t < hello.n_vocab for t in w.eos_token_ids):
        raise _bad(f"Welcome: eos ids {list(w.eos_token_ids)[:8]} outside the vocabulary")
    if not set(w.downlinks) <= set(DOWNLINKS) or len(w.model) > MAX_MODEL_NAME:
        raise _bad(f"Welcome: unknown downlinks {list(w.downlinks)} or an oversized model name")
    if len(w.replica) > MAX_REPLICA_ID or not w.replica.isprintable():
        raise _bad(f"Welcome: replica id {w.replica[:64]!r} (at most {MAX_REPLICA_ID} printable characters)")


def _check_id(token: int, n_vocab: int, what: str) -> None:
    if not 0 <= token < n_vocab:
        raise _bad(f"{what}: token id {token} outside the vocabulary of {n_vocab}")


def check_verdict(v: wire.VerdictMsg, *, gamma: int, n_vocab: int, resample_allowed: bool,
                  max_candidates: int, n_accepted: int | None = None) -> None:
    """A Verdict fits a round of `gamma` drafts (or, with `n_accepted`, answers a More).

    BONUS: all gamma accepted, a token, no downlink. CORRECTION: rejected at j < gamma, a
    token, no downlink. RESAMPLE (only where the device resamples: sampled dssd): j <
    gamma and P_j as a full row of n_vocab finite non-negative values with mass, a support
    of distinct in-vocabulary ids, or at most `max_candidates` candidates.
    """
    j = v.n_accepted
    if n_accepted is not None and (v.kind is not VerdictKind.RESAMPLE or j != n_accepted):
        raise _bad(f"answer to More: a {v.kind.name} at {j} for the rejection at {n_accepted}")
    if v.kind is VerdictKind.BONUS:
        if j != gamma:
            raise _bad(f"BONUS verdict: {j} of {gamma} drafts accepted")
    elif not 0 <= j < gamma:
        raise _bad(f"{v.kind.name} verdict: rejection at {j} in a round of {gamma} drafts")
    if v.kind is not VerdictKind.RESAMPLE:
        if v.downlink is not wire.DownlinkKind.NONE:
            raise _bad(f"{v.kind.name} verdict: it carries P_j")
        _check_id(v.token, n_vocab, f"{v.kind.name} verdict")
        return
    if not resample_allowed:
        raise _bad("RESAMPLE verdict: this request's rounds are decided on the edge (greedy or dsd)")
    if v.p_full is not None:
        row = v.p_full
        if row.size != n_vocab:
            raise _bad(f"RESAMPLE verdict: P_j has {row.size} entries for a vocabulary of {n_vocab}")
        if not (np.all(np.isfinite(row)) and np.all(row >= 0) and float(row.sum(dtype=np.float64)) > 0):
            raise _bad("RESAMPLE verdict: P_j is not a distribution (non-finite, negative or zero mass)")
        return
    if v.p_ids is None or v.p_ids.size == 0:
        raise _bad("RESAMPLE verdict: no P_j entries")
    if v.p_ids.min() < 0 or v.p_ids.max() >= n_vocab:
        raise _bad(f"RESAMPLE verdict: P_j ids outside the vocabulary of {n_vocab}")
    values = v.p_values
    if not np.all(np.isfinite(values) & (values > 0) & (values <= 1.0 + 1e-6)):
        raise _bad("RESAMPLE verdict: P_j values outside (0, 1]")
    if v.candidates:
        if v.p_ids.size > max_candidates:
            raise _bad(f"RESAMPLE verdict: {v.p_ids.size} candidates, {max_candidates} asked for")
    elif np.unique(v.p_ids).size != v.p_ids.size:
        raise _bad("RESAMPLE verdict: P_j's support repeats ids")


def check_tokens(msg: wire.Tokens, *, n_vocab: int, remaining: int) -> None:
    """Edge-only Tokens: 1..remaining ids (the edge decodes one per frame), all in the vocabulary."""
    if not 1 <= msg.ids.size <= max(remaining, 1):
        raise _bad(f"Tokens frame: {msg.ids.size} ids with {remaining} still to generate")
    if msg.ids.min() < 0 or msg.ids.max() >= n_vocab:
        raise _bad(f"Tokens frame: ids outside the vocabulary of {n_vocab}")


#: A log-softmax is <= 0; float rounding of the max-shifted sum may leave a hair above.
_LOGPROB_SLACK = 1e-5


def check_logprobs(lp: TokenLogprobs | None, *, n: int, k: int, n_vocab: int, where: str) -> None:
    """Logprobs of exactly the `n` tokens a frame settles, with `k` alternatives each: values
    <= 0 (not NaN; -inf allowed for a masked alternative), distinct in-vocabulary ids in
    non-increasing order of logprob."""
    if lp is None:
        raise _bad(f"{where}: no logprobs, and the request asked for them")
    if lp.n != n or lp.k != k:
        raise _bad(f"{where}: logprobs for {lp.n} tokens x {lp.k} alternatives, expected {n} x {k}")
    values = np.concatenate([lp.logprob, lp.top_logprobs.reshape(-1)])
    if np.any(np.isnan(values)) or np.any(values > _LOGPROB_SLACK) or np.any(lp.logprob == -np.inf):
        raise _bad(f"{where}: logprobs outside [-inf, 0] (or an emitted token at -inf)")
    if k and n:
        if lp.top_ids.min() < 0 or lp.top_ids.max() >= n_vocab:
            raise _bad(f"{where}: logprob alternatives outside the vocabulary of {n_vocab}")
        if np.any(np.diff(lp.top_logprobs, axis=1) > 0):
            raise _bad(f"{where}: logprob alternatives not in descending order")
        srt = np.sort(lp.top_ids, axis=1)
        if np.any(srt[:, 1:] == srt[:, :-1]):
            raise _bad(f"{where}: logprob alternatives repeat an id")
