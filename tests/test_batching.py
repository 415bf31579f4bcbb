"""Cross-session verification batching and the /metrics endpoint.

* `forward_batch` of the torch backend equals per-sequence forwards (logits to 1e-4 and
  the caches it leaves behind), after rollbacks of different lengths too;
* the scheduler's verdicts equal the unbatched `EdgeSession.verify`, per session, for
  greedy, sampled and DSD sessions batched together, and a refused round fails alone;
* eight real devices (llama.cpp drafters) with different prompts, gamma values and modes
  decode concurrently through one batching edge, and each output equals transformers'
  own greedy `generate`; the batch-size metric proves the batched path ran;
* /metrics parses as Prometheus text and its counters match the devices' own counts.
"""
from __future__ import annotations

import asyncio
import dataclasses
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from device_runtime.drafter import LlamaDrafter
from device_runtime.session import DeviceClient, GenerationConfig
from edge_service.backends.base import TargetModel
from edge_service.scheduler import BatchConfig, VerifyScheduler
from edge_service.server import EdgeServerThread, ServerConfig
from edge_service.session import EdgeLimits, EdgeSession, ProtocolError
from protocol import wire
from protocol.sampling import SamplingParams
from protocol.verification import VerdictKind
from protocol.wire import ErrorCode
from tests.test_end_to_end import reference_greedy

GREEDY = SamplingParams(0.0)
PROMPTS = (
    "Hello world",
    "The cat sat on the",
    "<|im_start|>user\nWhy is the sky blue?",
    "Once upon a time",
    "1 2 3 4 5",
    "<|im_start|>user\nWrite a poem<|im_end|>\n<|im_start|>assistant\n",
    "a",
    "The quick brown fox jumps over the lazy dog and",
)


# -- backend ----------------------------------------------------------------------------


def test_forward_batch_equals_per_sequence_forward(tiny_target):  # noqa: ANN001
    rng = np.random.default_rng(0)
    n_vocab = tiny_target.n_vocab
    batched = [tiny_target.new_sequence() for _ in range(5)]
    single = [tiny_target.new_sequence() for _ in range(5)]
    for b, s, n in zip(batched, single, (0, 1, 7, 23, 12)):  # one empty cache
        if n:
            ids = rng.integers(0, n_vocab, n).tolist()
            b.forward(ids)
            s.forward(ids)
    worst = 0.0
    for step in range(6):
        new = [rng.integers(0, n_vocab, int(rng.integers(1, 9))).tolist() for _ in batched]
        got = tiny_target.forward_batch(batched, new)
        want = [s.forward(ids) for s, ids in zip(single, new)]
        for g, w, ids in zip(got, want, new):
            assert g.shape == (len(ids), n_vocab) and g.dtype == np.float32
            worst = max(worst, float(np.abs(g - w).max()))
        for b, s in zip(batched, single):
            assert b.n_cached == s.n_cached
            # rollbacks of different lengths: none, some, or everything
            keep = (b.n_cached, int(rng.integers(0, b.n_cached + 1)), 0)[step % 3] if step < 5 else b.n_cached
            b.rollback(keep)
            s.rollback(keep)
    # the caches the batched path wrote back serve later single forwards identically
    for b, s in zip(batched, single):
        ids = rng.integers(0, n_vocab, 3).tolist()
        worst = max(worst, float(np.abs(b.forward(ids) - s.forward(ids)).max()))
    assert worst < 1e-4
    for seq in batched + single:
        seq.release()


def test_forward_keeps_only_the_rows_asked_for(tiny_target):  # noqa: ANN001
    """`keep` returns the last rows of the full result (0 for a prefill), single and batched."""
    rng = np.random.default_rng(1)
    n_vocab = tiny_target.n_vocab
    full = [tiny_target.new_sequence() for _ in range(3)]
    kept = [tiny_target.new_sequence() for _ in range(3)]
    for f, k, n in zip(full, kept, (5, 2, 11)):
        ids = rng.integers(0, n_vocab, n).tolist()
        want = f.forward(ids)
        assert k.forward(ids, keep=0).shape == (0, n_vocab) and k.n_cached == n
        f.rollback(n - 2)
        k.rollback(n - 2)
        np.testing.assert_allclose(k.forward(ids[-2:], keep=1), f.forward(ids[-2:])[-1:], atol=1e-5)
    new = [rng.integers(0, n_vocab, n).tolist() for n in (3, 6, 1)]
    got = tiny_target.forward_batch(kept, new, [2, 0, 1])
    want = [f.forward(ids) for f, ids in zip(full, new)]
    assert [g.shape[0] for g in got] == [2, 0, 1]
    for g, w, n in zip(got, want, (2, 0, 1)):
        np.testing.assert_allclose(g, w[w.shape[0] - n :], atol=1e-4)
    with pytest.raises(ValueError):
        kept[0].forward([1, 2], keep=3)
    for seq in full + kept:
        seq.release()


def test_base_forward_batch_default_loops(tiny_target):  # noqa: ANN001
    """The default (used by backends without batching, e.g. ONNX) is a loop of forwards."""
    a, b = tiny_target.new_sequence(), tiny_target.new_sequence()
    got = TargetModel.forward_batch(tiny_target, [a, b], [[1, 2, 3], [4]])
    assert [g.shape[0] for g in got] == [3, 1] and (a.n_cached, b.n_cached) == (3, 1)
    with pytest.raises(ValueError):
        tiny_target.forward_batch([a, a], [[1], [2]])
    with pytest.raises(ValueError):
        tiny_target.forward_batch([a, b], [[1]])


# -- scheduler --------------------------------------------------------------------------


def _same_verdict(a: wire.VerdictMsg, b: wire.VerdictMsg) -> None:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert x is not None and y is not None and x.shape == y.shape, f.name
            np.testing.assert_allclose(x, y, atol=1e-5, err_msg=f.name)
        else:
            assert x == y, f.name


def _started(model, sid: int, mode: str, sampling: SamplingParams, prompt: list[int]) -> EdgeSession:  # noqa: ANN001
    s = EdgeSession(model, EdgeLimits(max_new_tokens=512), sid)
    s.hello(wire.Hello(wire.VERSION, s.fingerprint, model.n_vocab))
    s.start(wire.Start(mode=mode, sampling=sampling, seed=sid, max_new_tokens=200,
                       prompt_ids=np.asarray(prompt, np.int32), downlink="auto"))
    return s


def test_non_finite_target_logits_are_refused_clearly(tiny_target):  # noqa: ANN001
    """NaN in the target's logits: a clear UNSUPPORTED refusal (devices do not retry it),
    on the numpy path and through the scheduler's torch path; the cache bookkeeping stays true."""
    for sampling in (GREEDY, SamplingParams(1.0, top_k=5), SamplingParams(0.8)):
        s = _started(tiny_target, 1, "dssd", sampling, [1, 2, 3])
        q = None if sampling.greedy else np.full(2, 0.5, np.float32)
        prep = s.prepare_verify(wire.Draft(3, np.zeros(0, np.int32), np.array([4, 5], np.int32), q, None))
        logits = s.sequence.forward(prep.new_ids, prep.n_rows)
        logits[1, 7] = np.nan
        with pytest.raises(ProtocolError) as err:
            s.finish_verify(prep, logits)
        assert err.value.code == ErrorCode.UNSUPPORTED and "non-finite" in str(err.value)
        assert len(s._cached) == s.sequence.n_cached
        s.close()


def test_greedy_dsd_needs_no_q_rows(tiny_target):  # noqa: ANN001
    """Greedy DSD reads no Q row: a draft without the one-hot rows is verified; sampled DSD still needs them."""
    s = _started(tiny_target, 1, "dsd", GREEDY, [1, 2, 3])
    reply = s.verify(wire.Draft(3, np.zeros(0, np.int32), np.array([4, 5], np.int32), None, None))
    assert reply.kind in (VerdictKind.BONUS, VerdictKind.CORRECTION)
    s.close()
    s = _started(tiny_target, 1, "dsd", SamplingParams(1.0), [1, 2, 3])
    with pytest.raises(ProtocolError):
        s.verify(wire.Draft(3, np.zeros(0, np.int32), np.array([4, 5], np.int32), None, None))
    s.close()


def test_scheduler_verdicts_equal_unbatched_verify(tiny_target):  # noqa: ANN001
    """Greedy, sampled (support downlink) and DSD sessions in one batch: same verdicts as alone."""
    rng = np.random.default_rng(1)
    n_vocab = tiny_target.n_vocab
    specs = [
        ("dssd", GREEDY, 1), ("dssd", GREEDY, 4), ("dssd", SamplingParams(1.0, top_k=6), 3),
        ("dssd", SamplingParams(0.8), 5), ("dsd", SamplingParams(1.0), 2), ("dssd-paper", GREEDY, 7),
    ]
    prompts = [rng.integers(0, n_vocab, int(rng.integers(1, 20))).tolist() for _ in specs]
    batched = [_started(tiny_target, i + 1, m, sp, p) for i, ((m, sp, _), p) in enumerate(zip(specs, prompts))]
    alone = [_started(tiny_target, i + 1, m, sp, p) for i, ((m, sp, _), p) in enumerate(zip(specs, prompts))]
    committed = [len(p) for p in prompts]
    prefix: list[list[int]] = [[] for _ in specs]
    pool = ThreadPoolExecutor(max_workers=1)

    async def go() -> None:
        loop = asyncio.get_running_loop()

        async def run(fn, *args):  # noqa: ANN001, ANN202
            return await loop.run_in_executor(pool, fn, *args)

        sched = VerifyScheduler(tiny_target, BatchConfig(window_ms=200, max_batch=len(specs)), run)
        for round_no in range(8):
            msgs = []
            for i, (mode, sampling, gamma) in enumerate(specs):
                greedy_target = None
                if round_no % 2 == 0:  # every other round, draft the target's own tokens (long accepts)
                    seq = tiny_target.new_sequence()
                    ctx = alone[i]._request.committed + prefix[i]
                    greedy_target = []
                    logits = seq.forward(ctx)[-1]
                    for _ in range(gamma):
                        greedy_target.append(int(np.argmax(logits)))
                        logits = seq.forward(greedy_target[-1:])[-1]
                    seq.release()
                draft = np.asarray(greedy_target or rng.integers(0, n_vocab, gamma).tolist(), np.int32)
                q_rows = q_draft = None
                if mode == "dsd":
                    q_rows = rng.random((gamma, n_vocab)).astype(np.float32) + 1e-3
                    q_rows /= q_rows.sum(axis=1, keepdims=True)
                elif not sampling.greedy:
                    q_draft = rng.uniform(0.05, 1.0, gamma).astype(np.float32)
                n_committed = committed[i] + len(prefix[i])
                if round_no == 3 and i == 2:
                    n_committed += 1  # a bad round in the batch: refused alone
                msgs.append(wire.Draft(n_committed, np.asarray(prefix[i], np.int32), draft, q_draft, q_rows))
            got = await asyncio.gather(*(sched.submit(s, m) for s, m in zip(batched, msgs)),
                                       return_exceptions=True)
            for i, (reply, msg) in enumerate(zip(got, msgs)):
                if round_no == 3 and i == 2:
                    assert isinstance(reply, ProtocolError) and reply.code == ErrorCode.DESYNC
                    continue
                assert not isinstance(reply, BaseException), reply
                want = alone[i].verify(msg)
                _same_verdict(reply, want)
                j = reply.n_accepted
                if reply.kind is VerdictKind.RESAMPLE:  # the device's residual draw becomes the prefix
                    row = reply.p_full if reply.p_full is not None else None
                    tok = int(np.argmax(row)) if row is not None else int(reply.p_ids[0])
                    committed[i] += len(prefix[i]) + j
                    prefix[i] = [tok]
                else:
                    committed[i] += len(prefix[i]) + j + 1
                    prefix[i] = []
                assert batched[i]._cached == alone[i]._cached
                assert batched[i].sequence.n_cached == alone[i].sequence.n_cached
        assert sched.batches == 8 and sched.rounds == 8 * len(specs) - 1
        await sched.close()

    asyncio.run(go())
    pool.shutdown()
    for s in batched + alone:
        s.close()


# -- end to end: eight devices, one edge ------------------------------------------------


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            samples[key] = s.value
    return samples


def _run_concurrently(url: str, drafters, jobs) -> list:  # noqa: ANN001
    async def one(drafter, ids, cfg):  # noqa: ANN001, ANN202
        client = DeviceClient(drafter, url, client_name="pytest-batching")
        try:
            return await client.generate(ids, cfg)
        finally:
            await client.close()

    async def go():  # noqa: ANN202
        return await asyncio.gather(*(one(d, ids, cfg) for d, (ids, cfg) in zip(drafters, jobs)))

    return asyncio.run(go())


@pytest.fixture(scope="module")
def drafters(tiny_pair):  # noqa: ANN001
    ds = [LlamaDrafter(tiny_pair.draft_gguf, n_ctx=512, n_threads=1, f32_kv_cache=True) for _ in range(9)]
    yield ds
    for d in ds:
        d.close()


def test_eight_concurrent_devices_greedy_equal_generate(tiny_target, drafters):  # noqa: ANN001
    config = ServerConfig(port=0, limits=EdgeLimits(max_new_tokens=512), metrics_port=0,
                          batching=BatchConfig(window_ms=20, max_batch=8))
    modes = ("dssd", "dssd", "dssd", "dssd-paper", "dssd", "dsd", "dssd", "dssd")
    gammas = (1, 2, 3, 4, 5, 6, 8, 4)
    jobs = []
    for prompt, mode, gamma in zip(PROMPTS, modes, gammas):
        ids = drafters[0].tokenize(prompt, add_bos=False)
        jobs.append((ids, GenerationConfig(mode=mode, max_new_tokens=48, sampling=GREEDY, gamma=gamma)))
    # a ninth device in edge-only mode: its decode steps join the verification batches
    jobs.append((drafters[0].tokenize("Edge only please", add_bos=False),
                 GenerationConfig(mode="edge-only", max_new_tokens=24, sampling=GREEDY)))
    with EdgeServerThread(tiny_target, config) as edge:
        results = _run_concurrently(edge.url, drafters, jobs)
        metrics = edge.server.metrics
        scraped = _scrape(edge.server.metrics_port)
    for (ids, cfg), got in zip(jobs, results):
        assert got.ids == reference_greedy(tiny_target, ids, cfg.max_new_tokens), (cfg.mode, cfg.gamma)
    spec = [r for r in results if r.stats.mode != "edge-only"]
    assert all(r.stats.rounds.rounds > 0 for r in spec)

    # the batched path ran: some forward verified more than one round
    reg = metrics.registry
    n_batches = reg.get_sample_value("dssd_verify_batch_size_count")
    singles = reg.get_sample_value("dssd_verify_batch_size_bucket", {"le": "1.0"})
    assert n_batches > singles, (n_batches, singles)
    assert scraped["dssd_verify_batch_size_sum"] > n_batches  # mean batch size > 1

    # the scrape parses and agrees with the devices' own counts
    rounds = sum(r.stats.rounds.rounds for r in spec)
    assert scraped["spec_decode_num_drafts_total"] == rounds
    assert scraped["spec_decode_num_draft_tokens_total"] == sum(r.stats.rounds.draft_tokens for r in spec)
    assert scraped["spec_decode_num_accepted_tokens_total"] == sum(r.stats.rounds.accepted_tokens for r in spec)
    assert scraped["spec_decode_num_accepted_tokens_per_pos_total{position=0}"] == sum(
        r.stats.rounds.accepted_per_position[0] for r in spec)
    edge_only = [r for r in results if r.stats.mode == "edge-only"]
    # a batch's members: the verification rounds and the edge-only steps (one per token)
    assert scraped["dssd_verify_batch_size_sum"] == rounds + sum(len(r.ids) for r in edge_only)
    assert scraped["dssd_verify_latency_seconds_count"] == rounds
    assert scraped["dssd_requests_total{mode=dssd}"] == 6
    assert scraped["dssd_requests_total{mode=edge-only}"] == 1
    # the devices count every frame of their requests; the edge also counts the Hello/Welcome
    assert scraped["dssd_bytes_received_total"] > sum(r.stats.bytes_up for r in results)
    assert scraped["dssd_bytes_sent_total"] > sum(r.stats.bytes_down for r in results)
    assert scraped["dssd_errors_total{code=BAD_FRAME}"] == 0
    assert "dssd_sessions_active" in scraped


def test_no_batching_verifies_rounds_alone(tiny_target, drafters):  # noqa: ANN001
    config = ServerConfig(port=0, limits=EdgeLimits(max_new_tokens=512),
                          batching=BatchConfig(enabled=False))
    jobs = [(drafters[0].tokenize(p, add_bos=False), GenerationConfig(mode="dssd", max_new_tokens=32,
                                                                      sampling=GREEDY, gamma=g))
            for p, g in zip(PROMPTS[:3], (2, 3, 5))]
    with EdgeServerThread(tiny_target, config) as edge:
        results = _run_concurrently(edge.url, drafters[:3], jobs)
        reg = edge.server.metrics.registry
        n_batches = reg.get_sample_value("dssd_verify_batch_size_count")
        singles = reg.get_sample_value("dssd_verify_batch_size_bucket", {"le": "1.0"})
    for (ids, cfg), got in zip(jobs, results):
        assert got.ids == reference_greedy(tiny_target, ids, cfg.max_new_tokens)
    assert n_batches == singles == sum(r.stats.rounds.rounds for r in results)


def test_metrics_count_errors_by_code(tiny_target):  # noqa: ANN001
    """A refused frame shows up under its error code; the text exposition parses."""
    from websockets.sync.client import connect

    with EdgeServerThread(tiny_target, ServerConfig(port=0, metrics_port=0)) as edge:
        with connect(edge.url, compression=None) as ws:
            ws.send(b"XX not a frame at all")
            reply = wire.decode(ws.recv(timeout=10)).message
            assert isinstance(reply, wire.Error) and reply.code == ErrorCode.BAD_FRAME
        scraped = _scrape(edge.server.metrics_port)
    assert scraped["dssd_errors_total{code=BAD_FRAME}"] == 1
    assert scraped["dssd_errors_total{code=DESYNC}"] == 0
    assert scraped["dssd_bytes_received_total"] >= len(b"XX not a frame at all")
