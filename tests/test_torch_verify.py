"""The edge's torch verification path against the numpy definition it implements.

* the transform: the probabilities of `protocol.sampling` bit for bit (the torch path
  selects candidates, the protocol's code does the rest), and the support of the previous
  numpy implementation, on adversarial rows, V = 1,000, 1,001 and 262,144, every setting;
* the generator: each session's is consumed as on the numpy path (same verdicts);
* the law: the statistical harness of tests/test_verification.py run through
  `verify_rounds` (DSSD, DSD, sampling settings through logits), and the same harness
  rejects the paper's reversed ratio on this path too.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from edge_service.session import PreparedRound, ProtocolError
from edge_service.torch_verify import host_rows, verify_rounds
from protocol.logprobs import OFF as LOGPROBS_OFF
from protocol import verification
from protocol.sampling import SamplingParams, probabilities, sample_rows
from protocol.verification import VerdictKind, device_resample_batch
from protocol.wire import ErrorCode
from benchmarks import sampling_before as old
from tests import test_verification as harness

torch.set_num_threads(1)


def _dense(rows: list) -> np.ndarray:
    return np.stack([row.dense() if hasattr(row, "dense") else row for row in rows])


@pytest.mark.parametrize("v", [1000, 1001, 262_144])  # 1001: not a multiple of the block
@pytest.mark.parametrize("params", old.ADVERSARIAL_SETTINGS, ids=str)
def test_transform_matches_numpy_on_adversarial_rows(v: int, params: SamplingParams) -> None:
    named = old.adversarial_rows(v)
    logits = np.stack(list(named.values()))
    rows = host_rows(torch.from_numpy(logits), params)
    assert all(row is not None for row in rows)
    got = _dense(rows)
    want = probabilities(logits, params)
    for name, g, w, ref in zip(named, got, want, old.probabilities(logits, params)):
        assert np.array_equal(g > 0, w > 0), f"{name}: support differs"
        assert np.array_equal(g > 0, ref > 0), f"{name}: support differs from the previous implementation"
        np.testing.assert_array_equal(g, w, err_msg=name)  # the same numpy code made them


def test_candidate_search_keeps_every_survivor() -> None:
    """Survivors spread over many blocks, and ties at the cut across blocks (whole-row fallback)."""
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 1, (6, 64 * 50)).astype(np.float32)
    logits[0, ::64] = 10 + rng.normal(size=50)  # one survivor per block
    logits[1, ::64] = 10.0  # 50 ties at the top, one per block
    logits[2, :] = 1.0
    for params in (SamplingParams(1.0, top_k=40), SamplingParams(0.5, top_k=3, top_p=0.9), SamplingParams(0.0)):
        got = _dense(host_rows(torch.from_numpy(logits), params))
        np.testing.assert_array_equal(got, probabilities(logits, params))


def test_half_precision_logits_are_upcast() -> None:
    logits = np.random.default_rng(1).normal(0, 3, (3, 500)).astype(np.float16)
    params = SamplingParams(0.7, top_k=40, top_p=0.95)
    got = _dense(host_rows(torch.from_numpy(logits), params))
    np.testing.assert_array_equal(got, probabilities(logits.astype(np.float32), params))


def test_non_finite_rows_are_flagged() -> None:
    logits = np.zeros((4, 50), np.float32)
    logits[1, 3] = np.nan
    logits[2, 7] = np.inf
    logits[3] = -np.inf
    for params in (SamplingParams(0.0), SamplingParams(1.0), SamplingParams(1.0, top_k=5)):
        rows = host_rows(torch.from_numpy(logits), params)
        assert [row is not None for row in rows] == [True, False, False, False]


# -- rounds as the edge builds them ---------------------------------------------------------


def _prep(draft: np.ndarray, rng: np.random.Generator, params: SamplingParams, mode: str = "dssd",
          q_draft: np.ndarray | None = None, q_rows: np.ndarray | None = None) -> PreparedRound:
    """The fields of a PreparedRound that verification reads."""
    msg = SimpleNamespace(q_draft=q_draft, q_rows=q_rows, n_candidates=0)
    request = SimpleNamespace(sampling=params, mode=mode, rng=rng, logprobs=LOGPROBS_OFF, constraint=None)
    return PreparedRound(msg, request, [], np.asarray(draft, np.int64), [], 0.0)  # type: ignore[arg-type]


def _torch_round(mode: str, params: SamplingParams | None = None):  # noqa: ANN202
    """A harness round (tests/test_verification.py) verified by `verify_rounds`: logits
    log P (T = 1 gives back P), or given logits under `params`."""

    def round_fn(P, Q, t, batch, rng, logits=None):  # noqa: ANN001, ANN202
        gamma = harness.GAMMA
        ids, q = harness._draft(Q, t, batch, rng)
        with np.errstate(divide="ignore"):
            src = np.log(P[t : t + gamma + 1]) if logits is None else logits[t : t + gamma + 1]
        rows = torch.from_numpy(np.ascontiguousarray(np.tile(src.astype(np.float32), (batch, 1))))
        sp = params or SamplingParams(1.0)
        preps = [_prep(ids[i], rng, sp, mode, q_draft=q[i], q_rows=Q[t : t + gamma] if mode == "dsd" else None)
                 for i in range(batch)]
        decided = verify_rounds(preps, rows, [gamma + 1] * batch)
        n_acc = np.array([v.n_accepted for v, _ in decided])
        tokens = np.array([v.token for v, _ in decided])
        rej = np.flatnonzero([v.kind is VerdictKind.RESAMPLE for v, _ in decided])
        if rej.size:  # the device's residual draw from P_j as it came down
            p_j = np.stack([decided[i][1].dense() for i in rej])
            tokens[rej] = device_resample_batch(p_j, Q[t + n_acc[rej]], rng)
        assert np.all(tokens >= 0)
        return ids, n_acc, tokens

    return round_fn


N_TORCH_TRIALS = 50_000  # the rounds go through per-round host code: fewer trials, same power for gross errors


@pytest.fixture
def fewer_trials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "N_TRIALS", N_TORCH_TRIALS)


@pytest.mark.parametrize("shape", ["random_v8", "disjoint_support", "target_one_hot", "close_tv_small"])
def test_torch_dssd_is_exact(shape: str, fewer_trials: None) -> None:
    P, Q = harness.SHAPES[shape]
    assert harness.joint_pvalue(P, Q, _torch_round("dssd")) > harness.P_MIN


@pytest.mark.parametrize("shape", ["random_v8", "disjoint_support"])
def test_torch_dsd_is_exact(shape: str, fewer_trials: None) -> None:
    P, Q = harness.SHAPES[shape]
    assert harness.joint_pvalue(P, Q, _torch_round("dsd")) > harness.P_MIN


@pytest.mark.parametrize("params", [SamplingParams(0.7), SamplingParams(1.0, top_k=3),
                                    SamplingParams(1.2, top_k=5, top_p=0.9), SamplingParams(0.7, top_p=0.8)], ids=str)
def test_torch_exact_under_each_sampling_setting(params: SamplingParams, fewer_trials: None) -> None:
    rng = np.random.default_rng(7)
    n, v = harness.N_TOKENS + harness.GAMMA + 1, 10
    lp = rng.normal(0, 2, (n, v)).astype(np.float32)
    lq = (lp + rng.normal(0, 1.5, (n, v))).astype(np.float32)
    P, Q = probabilities(lp, params), probabilities(lq, params)
    round_fn = _torch_round("dssd", params)
    assert harness.joint_pvalue(P, Q, lambda *a: round_fn(*a, logits=lp)) > harness.P_MIN


def test_torch_reversed_ratio_fails(monkeypatch: pytest.MonkeyPatch, fewer_trials: None) -> None:
    """The harness has the power to see the paper's min(1, q/p) on this path too."""
    monkeypatch.setattr(verification, "accept_mask", lambda p, q, u: u * p <= q)
    P, Q = harness.SHAPES["random_v8"]
    assert harness.joint_pvalue(P, Q, _torch_round("dssd")) < 1e-12


def test_rng_stream_equals_the_numpy_path() -> None:
    """Per round, each session's generator is consumed as edge_verify consumes it."""
    rng = np.random.default_rng(3)
    params = SamplingParams(0.9, top_k=20, top_p=0.9)
    logits = rng.normal(0, 2, (40, 5, 300)).astype(np.float32)
    p_rows = probabilities(logits.reshape(-1, 300), params).reshape(40, 5, 300)
    drafts = rng.integers(0, 300, (40, 4))
    drafts[::2] = p_rows[::2, :4].argmax(axis=2)  # every other round: likely all accepted
    q = np.clip(0.9 * p_rows[np.arange(40)[:, None], np.arange(4), drafts], 0.02, 1.0).astype(np.float32)
    preps = [_prep(drafts[i], np.random.default_rng(i), params, q_draft=q[i]) for i in range(40)]
    decided = verify_rounds(preps, torch.from_numpy(logits.reshape(-1, 300)), [5] * 40)
    kinds = set()
    for i, (verdict, support) in enumerate(decided):
        r = np.random.default_rng(i)
        want = verification.edge_verify(p_rows[i], drafts[i], q[i], r)
        assert verdict == want
        kinds.add(verdict.kind)
        if verdict.kind is VerdictKind.RESAMPLE:
            np.testing.assert_array_equal(support.ids, np.flatnonzero(p_rows[i, verdict.n_accepted]))
        assert r.random() == preps[i].request.rng.random()  # both generators at the same point
    assert kinds == {VerdictKind.BONUS, VerdictKind.RESAMPLE}


def test_non_finite_round_is_refused_alone() -> None:
    params = SamplingParams(1.0, top_k=5)
    logits = np.random.default_rng(0).normal(size=(6, 50)).astype(np.float32)
    logits[4, 2] = np.nan  # round 1's second row
    preps = [_prep(np.array([1, 2]), np.random.default_rng(i), params, q_draft=np.full(2, 0.5, np.float32))
             for i in range(2)]
    first, second = verify_rounds(preps, torch.from_numpy(logits), [3, 3])
    assert not isinstance(first, Exception)
    assert isinstance(second, ProtocolError) and second.code == ErrorCode.UNSUPPORTED
    assert "non-finite" in str(second)
