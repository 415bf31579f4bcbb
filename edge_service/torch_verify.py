"""Edge verification where the logits are: the vocabulary-sized work of the sampling
transform in torch, on the logits' device, over all rows of all rounds of a batch at once.

vLLM's rejection sampler runs on the GPU over the flattened (rounds x rows, V) logits and
moves only what the host needs; this is the same split, with one extra rule: it must be
*the* transform of `protocol.sampling`, bit for bit in the support. So torch does only the
selection, which is all that touches the vocabulary, and the k survivors of each row go
to the host, where `protocol.sampling.top_k_probabilities` (the very function the device
runs) does the softmax and top-p over them:

1. greedy: argmax per row (ties to the first, as numpy) -> host, R ids;
2. top-k: per row the maxima of blocks of `BLOCK` ids; the k best blocks hold the row's
   k largest entries; among them the 2k largest (in id order) and a bound on everything
   else -> host. The host scales the candidates exactly as `protocol.sampling.scale` and
   accepts them only if the bound scales strictly below the k-th scaled candidate, i.e.
   nothing outside can survive or tie; otherwise (more than k ties at the cut) that row
   goes whole through `protocol.sampling.probabilities`;
3. no top-k (plain temperature, top-p alone): the rows are dense by definition and go
   to the host whole (on a CPU edge that is no copy), through `protocol.sampling`.

Everything after the transform reads at most k entries a row and runs on the host with
the protocol's own rules: `protocol.verification.accept_lengths` with each session's own
generator, the bonus draw and the candidates from `protocol.downlink.RowSupport`, the DSD
residual with `protocol.verification.device_resample_batch`. Each session's generator is
consumed exactly as on the numpy path, so for a seed the tokens are the numpy path's
(tests/test_torch_verify.py checks verdicts and generator states).
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch

from edge_service.session import EdgeSession, PreparedRound, ProtocolError, verification_errors
from protocol.constraints import unpack
from protocol.downlink import RowSupport, as_support
from protocol.logprobs import OFF as LOGPROBS_OFF
from protocol.sampling import (
    NonFiniteLogits,
    SamplingParams,
    probabilities,
    scale,
    top_k_probabilities,
)
from protocol.verification import (
    Verdict,
    VerdictKind,
    accept_lengths,
    device_resample_batch,
    greedy_verify,
)

#: Ids per block of the candidate search (vocabularies are padded to multiples of 64 or
#: 128 in practice; another size falls back to torch.topk over the row).
BLOCK = 64

#: Candidates handed to the host per row, as a multiple of k: the margin that lets ties
#: at the k-th value be settled by `top_k_probabilities` without the whole row.
CANDIDATES = 2

#: A transformed row on the host: dense (V,) float32, its support, or None when its
#: logits define no distribution (NaN / +inf / no finite entry).
Row = np.ndarray | RowSupport | None


def host_rows(logits: torch.Tensor, params: SamplingParams) -> list[Row]:
    """`protocol.sampling.probabilities` of every row of (R, V) `logits` (any float dtype,
    any device), as host rows: supports under greedy and top-k, else dense."""
    n_rows, n_vocab = logits.shape
    x = logits.float()
    if params.greedy:
        ids = x.argmax(dim=1)
        top = x.gather(1, ids[:, None])[:, 0]
        return [RowSupport(np.array([i]), np.ones(1, np.float32), n_vocab) if np.isfinite(v) else None
                for i, v in zip(ids.cpu().numpy(), top.cpu().numpy())]
    k = params.top_k
    if not (k and k < n_vocab):
        return [_dense(row, params) for row in x.cpu().numpy()]
    ids, cand, bound = (t.cpu().numpy() for t in _candidates(x, k))
    rows: list[Row] = []
    for r in range(n_rows):
        scaled = scale(cand[r], params)
        top = scaled.max()
        if not np.isfinite(top):
            rows.append(None)
            continue
        kth = np.partition(scaled, scaled.size - k)[scaled.size - k]
        if not scale(bound[r : r + 1], params)[0] < kth:  # a tie across blocks at the cut: the whole row
            rows.append(_dense(x[r].cpu().numpy(), params))
            continue
        pos, values = top_k_probabilities(scaled, k, params.top_p)
        live = values > 0
        rows.append(RowSupport(ids[r][pos[live]], values[live], n_vocab))
    return rows


def _dense(row: np.ndarray, params: SamplingParams) -> Row:
    try:
        return probabilities(row, params)
    except NonFiniteLogits:
        return None


def _candidates(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the ids (ascending) and values of its `CANDIDATES` x k largest entries, and
    a bound that no other entry exceeds. NaN counts as the largest value (in torch's topk
    as in numpy's partition), so a NaN anywhere is among the candidates.

    The k largest entries lie in the k blocks with the largest maxima (a block outside
    them has a maximum below k other blocks' maxima, hence below k entries), so only
    those blocks are searched; the (k+1)-th block maximum bounds everything else.
    """
    n_rows, n_vocab = x.shape
    m = min(CANDIDATES * k, n_vocab - 1)
    n_blocks = n_vocab // BLOCK
    if n_vocab % BLOCK == 0 and k + 1 < n_blocks and m < k * BLOCK:
        blocks = x.reshape(n_rows, n_blocks, BLOCK)  # a view unless x is a column slice
        best, chosen = torch.topk(blocks.amax(dim=2), k + 1, dim=1)
        chosen = chosen[:, :k]
        pool = blocks.gather(1, chosen[:, :, None].expand(-1, -1, BLOCK)).reshape(n_rows, -1)
        pool_ids = (chosen[:, :, None] * BLOCK + torch.arange(BLOCK, device=x.device)).reshape(n_rows, -1)
        values, pos = torch.topk(pool, m + 1, dim=1)
        ids = pool_ids.gather(1, pos)
        bound = torch.maximum(best[:, k], values[:, m])
    else:
        values, ids = torch.topk(x, m + 1, dim=1)
        bound = values[:, m]
    ids, order = ids[:, :m].sort(dim=1)
    return ids, values[:, :m].gather(1, order), bound


def _p(row: np.ndarray | RowSupport, token: int) -> float:
    """p(token) of a host row."""
    if isinstance(row, RowSupport):
        i = int(np.searchsorted(row.ids, token))
        return float(row.values[i]) if i < row.ids.size and row.ids[i] == token else 0.0
    return float(row[token])


# -- the edge's batched rounds -----------------------------------------------------------


def verify_rounds(preps: Sequence[PreparedRound], logits: torch.Tensor, counts: Sequence[int]) -> list[
        tuple[Verdict, RowSupport | None] | Exception]:
    """Verdicts of a batch of rounds from the kept logits rows of their forward.

    `logits` holds `counts[i]` rows for round i, one round after another (the last
    gamma_i + 1 of them are used). Rounds are transformed together per sampling setting.
    Returns, per round, (verdict, P_j's support on a RESAMPLE) for
    `EdgeSession.apply_verdict`, or the round's own `ProtocolError`.
    """
    ends = list(itertools.accumulate(counts))
    groups: dict[SamplingParams, list[int]] = {}
    for i, prep in enumerate(preps):
        groups.setdefault(prep.request.sampling, []).append(i)
    rows: list[list[Row]] = [[] for _ in preps]
    refused: dict[int, ProtocolError] = {}
    with torch.inference_mode():
        for i, prep in enumerate(preps):
            span = slice(ends[i] - prep.n_rows, ends[i])
            if prep.request.logprobs != LOGPROBS_OFF:  # the raw rows, before any grammar mask
                prep.logits = logits[span].float().cpu().numpy().copy()
            try:
                words = EdgeSession.constrain_round(prep)
            except ProtocolError as exc:
                refused[i] = exc
                continue
            if words is not None:  # the grammar's mask, in place where the logits are
                allowed = torch.from_numpy(unpack(words, logits.shape[1])).to(logits.device)
                logits[span].masked_fill_(~allowed, float("-inf"))
        for params, members in groups.items():
            index = np.concatenate([np.arange(ends[i] - preps[i].n_rows, ends[i]) for i in members])
            if index.size == logits.shape[0] and np.array_equal(index, np.arange(index.size)):
                group_logits = logits  # the usual batch: every row, in order, no copy
            else:
                group_logits = logits.index_select(0, torch.as_tensor(index, device=logits.device))
            # the shared id space of protocol.vocab (a view): padding ids have P = 0
            flat = host_rows(group_logits[:, : preps[members[0]].n_tokens], params)
            at = 0
            for i in members:
                rows[i], at = flat[at : at + preps[i].n_rows], at + preps[i].n_rows
    results: list[tuple[Verdict, RowSupport | None] | Exception] = []
    for i, (prep, round_rows) in enumerate(zip(preps, rows)):
        if i in refused:
            results.append(refused[i])
            continue
        try:
            results.append(_verify(prep, round_rows))
        except ProtocolError as exc:
            results.append(exc)
    return results


def _verify(prep: PreparedRound, rows: list[Row]) -> tuple[Verdict, RowSupport | None]:
    """One round on its host rows, as `EdgeSession.finish_verify` does on dense ones."""
    r, msg, draft = prep.request, prep.msg, prep.draft
    gamma = draft.size
    with verification_errors():
        if any(row is None for row in rows):
            raise NonFiniteLogits("a verification row holds NaN or +inf, or no finite entry")
        if r.sampling.greedy:
            target = np.array([int(row.ids[0]) for row in rows])  # greedy rows are one-id supports
            return greedy_verify(target, draft), None
        p_draft = np.array([[_p(rows[i], int(draft[i])) for i in range(gamma)]], np.float32)
        q = msg.q_rows[np.arange(gamma), draft] if r.mode == "dsd" else msg.q_draft
        j = int(accept_lengths(p_draft, np.asarray(q, np.float32)[None], r.rng)[0])
    if j == gamma:
        token = as_support(rows[gamma]).draw(1, r.rng)[0][0]  # the draw sample_rows makes
        return Verdict(VerdictKind.BONUS, j, int(token)), None
    if r.mode == "dsd":
        p_j = rows[j].dense() if isinstance(rows[j], RowSupport) else rows[j]
        q_j = msg.q_rows[j, : p_j.size].astype(np.float32)  # the device's padding ids: Q = 0
        token = device_resample_batch(p_j[None], q_j[None], r.rng)[0]
        return Verdict(VerdictKind.CORRECTION, j, int(token)), None
    return Verdict(VerdictKind.RESAMPLE, j), as_support(rows[j])
