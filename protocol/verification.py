"""The verification math of speculative sampling, split between edge and device.

Rule (Leviathan et al. 2023; the DSSD paper prints the ratio upside down): accept draft
x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection j the next token
is drawn from norm(max(0, P_j - Q_j)); if all gamma drafts pass, a bonus token is drawn
from P_{gamma+1}. The committed tokens are then distributed exactly as sampling from P.

In DSSD the edge runs the accept/reject part (`edge_verify`) knowing only q_i(x_i), and
the device, which kept the full Q_j, runs the residual draw (`device_resample`), or, when
the edge sends only K candidates drawn from P_j instead of the whole row, candidate
residual sampling (`draw_candidates_batch` on the edge, one row at a time as
`protocol.downlink.RowSupport.draw`, `candidate_resample` on the device). In DSD
the edge receives full Q rows and does both (`dsd_verify`). Greedy decoding needs no
distributions at all (`greedy_verify`).

Every rule is implemented once, over a batch of independent rounds (leading axis B):
that is what a batching edge needs, and what lets the exactness tests run 100k+ trials
through the very code the product runs. The single-round functions are thin views.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from protocol.sampling import sample_rows


class VerdictKind(enum.IntEnum):
    """What follows the accepted draft prefix."""

    BONUS = 0  # all drafts accepted; `token` was drawn from P_{gamma+1}
    CORRECTION = 1  # rejected; `token` is the replacement, already decided (greedy, DSD)
    RESAMPLE = 2  # rejected; the device must draw the replacement from its residual


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: VerdictKind
    n_accepted: int  # leading draft tokens accepted, 0..gamma
    token: int = -1  # the next token for BONUS / CORRECTION; -1 for RESAMPLE


@dataclass(frozen=True)
class VerdictBatch:
    """Verdicts of B independent rounds, as parallel arrays."""

    kind: np.ndarray  # (B,) VerdictKind values
    n_accepted: np.ndarray  # (B,)
    token: np.ndarray  # (B,), -1 where the device must resample

    def item(self, i: int) -> Verdict:
        return Verdict(VerdictKind(int(self.kind[i])), int(self.n_accepted[i]), int(self.token[i]))


def accept_mask(p_draft: np.ndarray, q_draft: np.ndarray, u: np.ndarray) -> np.ndarray:
    """u_i <= p_i / q_i, written without the division so q_i = 0 can never divide."""
    return u * q_draft <= p_draft


def _check(p_rows: np.ndarray, draft_ids: np.ndarray) -> np.ndarray:
    draft_ids = np.asarray(draft_ids, dtype=np.int64)
    if p_rows.ndim != 3 or draft_ids.ndim != 2 or p_rows.shape[:2] != (
        draft_ids.shape[0],
        draft_ids.shape[1] + 1,
    ):
        raise ValueError(
            f"need (B, gamma + 1, V) target rows for (B, gamma) drafts, got {p_rows.shape} "
            f"and {draft_ids.shape}"
        )
    if draft_ids.size and (draft_ids.min() < 0 or draft_ids.max() >= p_rows.shape[2]):
        raise ValueError("draft token id outside the vocabulary")
    return draft_ids


def accept_lengths(p_draft: np.ndarray, q_draft: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The acceptance test of B rounds: (B,) accepted-prefix lengths from (B, gamma)
    p_i(x_i) and q_i(x_i), drawing (B, gamma) uniforms from `rng`.

    The rule itself, apart from where the rows live: the numpy path below and the edge's
    torch path (edge_service.torch_verify) both call it with the p values they gathered.
    """
    q_draft = np.asarray(q_draft, dtype=np.float32)
    if q_draft.shape != p_draft.shape:
        raise ValueError(f"need q of shape {p_draft.shape}, got {q_draft.shape}")
    if not np.all((q_draft > 0.0) & (q_draft <= 1.0 + 1e-6)):
        raise ValueError("draft probabilities q(x) must lie in (0, 1]")
    batch, gamma = p_draft.shape
    accepted = accept_mask(p_draft, q_draft, rng.random((batch, gamma)))
    return np.where(accepted.all(axis=1), gamma, np.argmin(accepted, axis=1) if gamma else 0)


def _accept_prefix(
    p_rows: np.ndarray, draft_ids: np.ndarray, q_draft: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Accepted-prefix lengths, and tokens with the bonus drawn where all were accepted."""
    gamma = draft_ids.shape[1]
    p_draft = np.take_along_axis(p_rows[:, :gamma], draft_ids[:, :, np.newaxis], axis=2)[:, :, 0]
    n_accepted = accept_lengths(p_draft, q_draft, rng)
    all_ok = n_accepted == gamma
    tokens = np.full(draft_ids.shape[0], -1, dtype=np.int64)
    if all_ok.any():
        tokens[all_ok] = sample_rows(p_rows[all_ok, gamma], rng)
    return n_accepted, tokens


def edge_verify_batch(
    p_rows: np.ndarray, draft_ids: np.ndarray, q_draft: np.ndarray, rng: np.random.Generator
) -> VerdictBatch:
    """Edge half of DSSD for B rounds: (B, gamma + 1, V) target rows, (B, gamma) drafts and q."""
    draft_ids = _check(p_rows, draft_ids)
    n_accepted, tokens = _accept_prefix(p_rows, draft_ids, q_draft, rng)
    kind = np.where(n_accepted == draft_ids.shape[1], VerdictKind.BONUS, VerdictKind.RESAMPLE)
    return VerdictBatch(kind, n_accepted, tokens)


def edge_verify(
    p_rows: np.ndarray, draft_ids: np.ndarray, q_draft: np.ndarray, rng: np.random.Generator
) -> Verdict:
    """Edge half of DSSD for one round. On RESAMPLE the caller sends P_j down."""
    return edge_verify_batch(
        p_rows[np.newaxis], np.asarray(draft_ids)[np.newaxis], np.asarray(q_draft)[np.newaxis], rng
    ).item(0)


def device_resample_batch(
    p_rows: np.ndarray, q_rows: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Device half of DSSD: one draw per row from norm(max(0, P_j - Q_j)).

    A residual with no mass (P_j == Q_j up to rounding, where a rejection has probability
    ~0 anyway) falls back to P_j, the only sensible limit.
    """
    residual = np.subtract(p_rows, q_rows, dtype=np.float32)
    np.maximum(residual, 0.0, out=residual)
    empty = ~(residual.sum(axis=1, dtype=np.float64) > 0.0)
    if empty.any():
        residual[empty] = p_rows[empty]
    return sample_rows(residual, rng)


def device_resample(p_row: np.ndarray, q_row: np.ndarray, rng: np.random.Generator) -> int:
    return int(device_resample_batch(p_row[np.newaxis], q_row[np.newaxis], rng)[0])


def device_resample_sparse(
    p_ids: np.ndarray, p_values: np.ndarray, q_row: np.ndarray, rng: np.random.Generator
) -> int:
    """`device_resample` when P_j arrives as its support (top-k/top-p truncation).

    Outside the support P_j is 0, so max(0, P - Q) is 0 there too: restricting both to
    the support is the exact residual.
    """
    p_ids = np.asarray(p_ids, dtype=np.int64)
    pick = device_resample(np.asarray(p_values, np.float32), q_row[p_ids], rng)
    return int(p_ids[pick])


def draw_candidates_batch(
    p_rows: np.ndarray, k: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Edge half of candidate residual sampling: k i.i.d. draws from each P_j, with P_j there."""
    ids = sample_rows(p_rows, rng, k)
    return ids, np.take_along_axis(p_rows, ids, axis=1).astype(np.float32)


def candidate_resample_batch(
    cand_ids: np.ndarray, cand_p: np.ndarray, q_rows: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Device half: accept candidate y with probability max(0, 1 - Q_j(y) / P_j(y)).

    One trial succeeds with probability sum_y P(y) max(0, 1 - Q(y)/P(y)) =
    sum_y max(0, P(y) - Q(y)), and the token it yields is y with probability
    proportional to max(0, P(y) - Q(y)): exactly the residual law. The first success of
    each row is returned; -1 where all its candidates failed (ask for more, or the row).
    """
    cand_ids = np.asarray(cand_ids, dtype=np.int64)
    q = np.take_along_axis(q_rows, cand_ids, axis=1)
    ok = rng.random(cand_ids.shape) * cand_p < cand_p - q  # u < 1 - q/p without dividing
    first = np.argmax(ok, axis=1)
    return np.where(ok.any(axis=1), cand_ids[np.arange(cand_ids.shape[0]), first], -1)


def candidate_resample(
    cand_ids: np.ndarray, cand_p: np.ndarray, q_row: np.ndarray, rng: np.random.Generator
) -> int | None:
    """`candidate_resample_batch` for one rejection; None when every candidate failed."""
    tok = int(candidate_resample_batch(np.asarray(cand_ids)[np.newaxis], np.asarray(cand_p)[np.newaxis],
                                       q_row[np.newaxis], rng)[0])
    return None if tok < 0 else tok


def dsd_verify_batch(
    p_rows: np.ndarray, q_rows: np.ndarray, draft_ids: np.ndarray, rng: np.random.Generator
) -> VerdictBatch:
    """DSD for B rounds: the edge holds full (B, gamma, V) Q rows and runs the whole rule."""
    draft_ids = _check(p_rows, draft_ids)
    batch, gamma = draft_ids.shape
    if q_rows.shape != (batch, gamma, p_rows.shape[2]):
        raise ValueError(f"need Q rows of shape {(batch, gamma, p_rows.shape[2])}, got {q_rows.shape}")
    q_draft = np.take_along_axis(q_rows, draft_ids[:, :, np.newaxis], axis=2)[:, :, 0]
    n_accepted, tokens = _accept_prefix(p_rows, draft_ids, q_draft, rng)
    rejected = np.flatnonzero(n_accepted < gamma)
    if rejected.size:
        j = n_accepted[rejected]
        tokens[rejected] = device_resample_batch(p_rows[rejected, j], q_rows[rejected, j], rng)
    kind = np.where(n_accepted == gamma, VerdictKind.BONUS, VerdictKind.CORRECTION)
    return VerdictBatch(kind, n_accepted, tokens)


def dsd_verify(
    p_rows: np.ndarray, q_rows: np.ndarray, draft_ids: np.ndarray, rng: np.random.Generator
) -> Verdict:
    return dsd_verify_batch(
        p_rows[np.newaxis], q_rows[np.newaxis], np.asarray(draft_ids)[np.newaxis], rng
    ).item(0)


def greedy_verify(target_ids: np.ndarray, draft_ids: np.ndarray) -> Verdict:
    """Greedy: accept while the draft equals the target's argmax; then take the argmax."""
    target_ids = np.asarray(target_ids)
    draft_ids = np.asarray(draft_ids)
    gamma = draft_ids.shape[0]
    if target_ids.shape[0] != gamma + 1:
        raise ValueError(f"need gamma + 1 = {gamma + 1} target ids, got {target_ids.shape[0]}")
    mismatch = np.flatnonzero(target_ids[:gamma] != draft_ids)
    if mismatch.size == 0:
        return Verdict(VerdictKind.BONUS, gamma, int(target_ids[gamma]))
    j = int(mismatch[0])
    return Verdict(VerdictKind.CORRECTION, j, int(target_ids[j]))
