"""Exact by default: a misconfigured or hostile edge is an error, never draft text.

Every case of the "Exact by default" issue, against the real stack (llama.cpp device,
transformers edge, real WebSocket connections on loopback): wrong scheme, wrong port,
strangers' sockets in front of an authenticated edge, token and CA file through every
entry point, a fast client never refused and a flooding one refused (with no timing
assumption: the model worker is held busy by the test), and a hostile edge.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from device_runtime.__main__ import EXIT_ERROR, EXIT_UNVERIFIED, UNVERIFIED_CLOSE, UNVERIFIED_OPEN
from device_runtime.api import DeviceRuntime
from device_runtime.drafter import LlamaDrafter
from device_runtime.session import DeviceClient, EdgeLost, GenerationConfig
from device_runtime.transport import EdgeError, EdgeUnreachable
from edge_service.server import MAX_HELLO_BYTES, EdgeServerThread, ServerConfig, WorkBudget
from edge_service.session import EdgeLimits, EdgeSession, ProtocolError
from protocol import wire
from protocol.downlink import MAX_MORE_PER_ROUND
from protocol.sampling import SamplingParams
from protocol.verification import VerdictKind
from protocol.vocab import vocab_fingerprint
from protocol.wire import ErrorCode
from tests.test_end_to_end import reference_greedy
from tests.test_law_real_stack import FrameDropProxy
from tests.test_reliability import _free_port, _generate, _self_signed

GREEDY = SamplingParams(0.0)
PROMPT = "The cat sat on the"


@pytest.fixture(scope="module")
def drafter(tiny_pair) -> LlamaDrafter:  # noqa: ANN001
    d = LlamaDrafter(tiny_pair.draft_gguf, n_ctx=512, n_threads=1, f32_kv_cache=True)
    yield d
    d.close()


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "device_runtime", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _hello(target: Any, token: str = "") -> bytes:
    return wire.encode(wire.Hello(wire.VERSION, vocab_fingerprint(target.vocab_tokens), target.n_vocab,
                                  auth_token=token))


# -- a misconfigured edge: clear error, non-zero exit, no text --------------------------------


@pytest.mark.parametrize("fallback", [False, True])
def test_cli_wrong_scheme_and_wrong_port_fail_clearly(fallback, tiny_pair, tiny_edge):  # noqa: ANN001
    port = tiny_edge.url.rsplit(":", 1)[1]
    common = ["--model", str(tiny_pair.draft_gguf), "--threads", "1", "-n", "16", "--prompt", PROMPT]
    common += ["--fallback"] if fallback else []
    for url, cause in ((f"wss://127.0.0.1:{port}", "TLS"), (f"ws://127.0.0.1:{_free_port()}", "connection refused")):
        out = _cli("--edge", url, *common)
        assert out.returncode == 1, (url, out.stderr)
        assert out.stdout == "", out.stdout  # not even the prompt: nothing was generated
        lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and cause in lines[0] and url in lines[0], out.stderr


def test_plain_ws_against_a_tls_edge_and_untrusted_certificate(tmp_path, tiny_target, drafter):  # noqa: ANN001
    cert, key = _self_signed(tmp_path)
    with EdgeServerThread(tiny_target, ServerConfig(port=0, tls_cert=cert, tls_key=key)) as edge:
        plain = DeviceClient(drafter, edge.url.replace("wss://", "ws://"))
        with pytest.raises(EdgeUnreachable, match="wss://") as err:
            _generate(plain, [5, 6, 7], GenerationConfig(sampling=GREEDY, fallback=True))
        assert err.value.permanent
        untrusted = DeviceClient(drafter, edge.url)
        with pytest.raises(EdgeUnreachable, match="certificate verification failed"):
            _generate(untrusted, [5, 6, 7], GenerationConfig(sampling=GREEDY, fallback=True))


@pytest.mark.parametrize("code", ["AUTH", "VOCAB_MISMATCH"])
def test_refusals_that_never_heal_are_never_transient(code, tmp_path, tiny_pair, tiny_target, drafter):  # noqa: ANN001
    config = ServerConfig(port=0, auth_tokens=frozenset({"s3cret"}))
    with EdgeServerThread(tiny_target, config) as edge:
        if code == "AUTH":
            client = DeviceClient(drafter, edge.url, auth_token="wrong")
        else:
            other = LlamaDrafter(tiny_pair.other_vocab_gguf, n_ctx=128, n_threads=1)
            client = DeviceClient(other, edge.url, auth_token="s3cret")
        emitted: list[int] = []
        with pytest.raises(EdgeError) as err:
            _generate(client, [5, 6, 7], GenerationConfig(sampling=GREEDY, fallback=True),
                      lambda ids, text, verified: emitted.extend(ids))
        assert err.value.code == ErrorCode[code] and emitted == []
        if code != "AUTH":
            other.close()


def test_vocabulary_rows_are_compared_explicitly_at_the_handshake(tiny_target):  # noqa: ANN001
    """Same tokens: a device with more logits rows (padding) pairs, and every row on the wire
    then has the device's width; one with fewer rows than the real tokens is refused."""
    s = EdgeSession(tiny_target, EdgeLimits(), 1)
    welcome = s.hello(wire.Hello(wire.VERSION, s.fingerprint, tiny_target.n_vocab + 64))
    assert welcome.n_vocab == tiny_target.n_vocab + 64
    assert s.pairing is not None and s.pairing.n_tokens == tiny_target.n_vocab
    s = EdgeSession(tiny_target, EdgeLimits(), 2)
    with pytest.raises(ProtocolError, match="logits rows") as err:
        s.hello(wire.Hello(wire.VERSION, s.fingerprint, tiny_target.n_vocab - 1))
    assert err.value.code == ErrorCode.VOCAB_MISMATCH


# -- strangers in front of an authenticated edge ----------------------------------------------


def test_unauthenticated_sockets_do_not_lock_out_an_authenticated_device(tiny_target, drafter):  # noqa: ANN001
    """Two strangers that never say Hello, max_sessions 2: the device's output is exact."""
    config = ServerConfig(port=0, max_sessions=2, auth_tokens=frozenset({"s3cret"}), handshake_timeout_s=60)
    ids = drafter.tokenize(PROMPT, add_bos=False)
    with EdgeServerThread(tiny_target, config) as edge:

        async def go() -> Any:
            async with connect(edge.url) as _s1, connect(edge.url) as _s2:
                for _ in range(100):  # both are held, in their handshake
                    if edge.server.pending_handshakes == 2:
                        break
                    await asyncio.sleep(0.05)
                assert edge.server.pending_handshakes == 2
                client = DeviceClient(drafter, edge.url, auth_token="s3cret")
                try:
                    return await client.generate(ids, GenerationConfig(sampling=GREEDY, max_new_tokens=32))
                finally:
                    await client.close()

        res = asyncio.run(go())
    assert res.exact and res.ids == reference_greedy(tiny_target, ids, 32)


def test_unauthenticated_connections_are_capped_oldest_first(tiny_target):  # noqa: ANN001
    config = ServerConfig(port=0, max_unauthenticated=2, handshake_timeout_s=60)
    with EdgeServerThread(tiny_target, config) as edge:

        async def go() -> tuple[Any, Any]:
            async with connect(edge.url) as oldest:
                await asyncio.sleep(0.2)
                async with connect(edge.url) as _second, connect(edge.url) as newest:
                    closed = wire.decode(await asyncio.wait_for(oldest.recv(), 30)).message
                    await newest.send(_hello(tiny_target))
                    welcome = wire.decode(await newest.recv()).message
                    return closed, welcome

        closed, welcome = asyncio.run(go())
    assert isinstance(closed, wire.Error) and closed.code == ErrorCode.LIMIT and "oldest" in closed.message
    assert isinstance(welcome, wire.Welcome)


def test_busy_with_fallback_off_is_a_clear_error(tiny_target, drafter):  # noqa: ANN001
    with EdgeServerThread(tiny_target, ServerConfig(port=0, max_sessions=1)) as edge:

        async def go() -> None:
            async with connect(edge.url) as holder:
                await holder.send(_hello(tiny_target))
                assert isinstance(wire.decode(await holder.recv()).message, wire.Welcome)
                client = DeviceClient(drafter, edge.url)
                try:
                    await client.generate([5, 6, 7], GenerationConfig(sampling=GREEDY, fallback=True))
                finally:
                    await client.close()

        with pytest.raises(EdgeError) as err:
            asyncio.run(go())
    assert err.value.code == ErrorCode.BUSY and "busy" in str(err.value)


def test_oversized_hello_closes_with_1009_before_any_allocation(tiny_target):  # noqa: ANN001
    with EdgeServerThread(tiny_target, ServerConfig(port=0)) as edge:

        async def go() -> int:
            async with connect(edge.url, max_size=None) as ws:
                await ws.send(bytes(MAX_HELLO_BYTES + 1))
                try:
                    await asyncio.wait_for(ws.recv(), 30)
                except ConnectionClosed as exc:
                    return exc.rcvd.code
            return -1

        assert asyncio.run(go()) == 1009
        assert edge.server.active_sessions == 0


# -- a fast client is never refused; a flooding one is -----------------------------------------


class _HeldWorker:
    """Holds the edge's model worker busy: the edge is as slow as a test wants, so a client is
    "infinitely fast" relative to it, whatever the machine."""

    def __init__(self, edge: EdgeServerThread) -> None:
        self._release = threading.Event()
        self._edge = edge

    def __enter__(self) -> "_HeldWorker":
        self._edge.server._worker.submit(self._release.wait)  # noqa: SLF001
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()


def _start_frame(session: int, ids: list[int], mode: str = "dssd") -> bytes:
    return wire.encode(wire.Start(mode, GREEDY, 0, 4, np.asarray(ids, np.int32)), session=session)


def test_a_fast_well_behaved_client_is_never_refused(tiny_target, drafter):  # noqa: ANN001
    """Start and its first Draft land while the model is busy; then 1,600 rounds on a frozen
    clock (no time passes between frames: an infinitely fast machine). The old limit of
    500 frames/s refused this client on any machine fast enough."""
    config = ServerConfig(port=0, clock=lambda: 0.0)
    ids = drafter.tokenize(PROMPT, add_bos=False)
    empty = np.zeros(0, np.int32)
    with EdgeServerThread(tiny_target, config) as edge:

        async def go() -> int:
            rounds = 0
            async with connect(edge.url) as ws:
                await ws.send(_hello(tiny_target))
                sid = wire.decode(await ws.recv()).message.session_id
                for request in range(4):
                    start = wire.encode(wire.Start("dssd", GREEDY, request, 450, np.asarray(ids, np.int32)), session=sid)
                    first = wire.encode(wire.Draft(len(ids), empty, empty), session=sid)
                    if request == 0:
                        with _HeldWorker(edge):  # both frames wait in the edge's queue
                            await ws.send(start)
                            await ws.send(first)
                    else:
                        await ws.send(start)
                        await ws.send(first)
                    n = len(ids)
                    for r in range(400):  # gamma 0: one forward and one token per round
                        msg = wire.decode(await ws.recv()).message
                        assert isinstance(msg, wire.VerdictMsg), msg
                        rounds += 1
                        n += 1
                        if r < 399:
                            await ws.send(wire.encode(wire.Draft(n, empty, empty), session=sid, round=r))
                    await ws.send(wire.encode(wire.End(n), session=sid))
                    assert isinstance(wire.decode(await ws.recv()).message, wire.Done)
            return rounds

        assert asyncio.run(go()) == 1600


def test_a_flooding_client_is_refused(tiny_target):  # noqa: ANN001
    """Start/End pairs are each valid; sent without waiting for the replies they are a flood."""
    with EdgeServerThread(tiny_target, ServerConfig(port=0)) as edge:

        async def go() -> Any:
            async with connect(edge.url) as ws:
                await ws.send(_hello(tiny_target))
                sid = wire.decode(await ws.recv()).message.session_id
                with _HeldWorker(edge):
                    for _ in range(8):
                        await ws.send(_start_frame(sid, [5, 6, 7]))
                        await ws.send(wire.encode(wire.End(3), session=sid))
                    first = wire.decode(await asyncio.wait_for(ws.recv(), 60)).message
                return first

        first = asyncio.run(go())
    assert isinstance(first, wire.Error) and first.code == ErrorCode.LIMIT and "without waiting" in first.message


def test_work_budget_delays_and_never_refuses() -> None:
    now = [0.0]
    budget = WorkBudget(rate=1000.0, burst=100, clock=lambda: now[0])
    assert budget.charge(100) == 0.0  # the burst
    assert budget.charge(50) == pytest.approx(0.05)  # owed 50 tokens at 1000/s
    now[0] = 0.05
    assert budget.charge(0) == 0.0  # paid back
    frozen = WorkBudget(rate=1000.0, burst=10, clock=lambda: 0.0)
    delays = [frozen.charge(10) for _ in range(5)]
    assert delays == sorted(delays) and all(d >= 0 for d in delays)  # slower, never refused
    assert WorkBudget(rate=0, burst=1).charge(10**9) == 0.0  # 0: unlimited


def test_more_requests_per_rejection_are_capped(tiny_target):  # noqa: ANN001
    s = EdgeSession(tiny_target, EdgeLimits(), 1)
    s.hello(wire.Hello(wire.VERSION, s.fingerprint, tiny_target.n_vocab))
    prompt = np.array([5, 6, 7, 8], np.int32)
    params = SamplingParams(1.0, top_k=4)
    s.start(wire.Start("dssd", params, 0, 16, prompt, downlink="candidates"))
    logits = tiny_target.new_sequence().forward(prompt.tolist())[-1]
    outside = int(np.argsort(logits)[0])  # outside the top 4: P = 0, always rejected
    verdict = s.verify(wire.Draft(4, np.zeros(0, np.int32), np.array([outside], np.int32),
                                  q_draft=np.ones(1, np.float32), n_candidates=1))
    assert verdict.kind is VerdictKind.RESAMPLE and verdict.candidates
    for _ in range(MAX_MORE_PER_ROUND):
        assert s.more(wire.More(1)).candidates
    with pytest.raises(ProtocolError) as err:
        s.more(wire.More(1))
    assert err.value.code == ErrorCode.LIMIT


# -- token and CA file through every entry point ------------------------------------------------


def test_token_and_ca_file_reach_the_cli_the_library_and_serve(tmp_path, tiny_pair, tiny_target, drafter):  # noqa: ANN001
    cert, key = _self_signed(tmp_path)
    config = ServerConfig(port=0, auth_tokens=frozenset({"s3cret"}), tls_cert=cert, tls_key=key)
    ids = drafter.tokenize(PROMPT, add_bos=False)
    want = reference_greedy(tiny_target, ids, 12)
    with EdgeServerThread(tiny_target, config) as edge:
        # the CLI
        out = _cli("--edge", edge.url, "--model", str(tiny_pair.draft_gguf), "--threads", "1", "-n", "12",
                   "--prompt", PROMPT, "-t", "0", "--token", "s3cret", "--ca-file", cert, "--json")
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)  # one parseable document
        assert doc["ids"] == want and doc["exact"] and all(doc["verified"])
        # the library
        with DeviceRuntime(drafters=[drafter], edge_url=edge.url, auth_token="s3cret", ca_file=cert) as rt:
            assert rt.generate(list(ids), temperature=0, max_tokens=12).ids == want
        # the OpenAI server
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "device_runtime", "serve", "--edge", edge.url, "--model",
             str(tiny_pair.draft_gguf), "--threads", "1", "--port", str(port), "--token", "s3cret",
             "--ca-file", cert], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            assert "ready" in proc.stdout.readline()
            body = json.dumps({"model": Path(tiny_pair.draft_gguf).stem, "prompt": list(ids), "max_tokens": 12, "temperature": 0}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            resp = json.loads(urllib.request.urlopen(req, timeout=120).read())
            assert resp["dssd"]["exact"] and resp["usage"]["completion_tokens"] == len(want)
            assert resp["choices"][0]["text"] == drafter.detokenize(want).decode("utf-8", "replace")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


# -- fallback only when asked for, reported in the exit status ----------------------------------


def test_lost_edge_without_fallback_raises_after_one_reconnect(tiny_target, drafter):  # noqa: ANN001
    """The edge goes away mid-generation and does not come back: EdgeLost, verified tokens only."""
    ids = drafter.tokenize(PROMPT, add_bos=False)
    edge = EdgeServerThread(tiny_target, ServerConfig(port=0)).__enter__()
    emitted: list[bool] = []
    stopping: list[threading.Thread] = []

    def on_tokens(new: list[int], text: str, verified: bool) -> None:
        emitted.extend([verified] * len(new))
        if len(emitted) >= 8 and not stopping:  # the edge shuts down and stays down
            stopping.append(threading.Thread(target=edge.__exit__, daemon=True))
            stopping[0].start()

    client = DeviceClient(drafter, edge.url)
    try:
        with pytest.raises(EdgeLost, match="mid-generation"):
            _generate(client, ids, GenerationConfig(sampling=GREEDY, gamma=2, max_new_tokens=400, round_timeout_s=30),
                      on_tokens)
    finally:
        if stopping:
            stopping[0].join(60)
    assert all(emitted) and len(emitted) >= 8


# -- a hostile edge ------------------------------------------------------------------------------


def _scripted_edge(make_reply: Callable[[wire.Welcome, wire.Message], list[bytes]], welcome: wire.Welcome | None,
                   n_vocab: int, fingerprint: str):  # noqa: ANN202
    """A real WebSocket server that answers the device with scripted (hostile) frames."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    good = wire.Welcome(7, "hostile", fingerprint, n_vocab, (0,), 8, 512, 256, ("auto", "full"))
    w = welcome or good

    async def handler(ws) -> None:  # noqa: ANN001
        try:
            hello = wire.decode(await ws.recv()).message
            assert isinstance(hello, wire.Hello)
            await ws.send(wire.encode(w, session=7))
            while True:
                msg = wire.decode(await ws.recv(), max_frame=2**24).message
                for data in make_reply(w, msg):
                    await ws.send(data)
        except ConnectionClosed:
            pass

    async def start() -> Any:
        return await serve(handler, "127.0.0.1", 0, compression=None, max_size=2**24)

    thread.start()
    server = asyncio.run_coroutine_threadsafe(start(), loop).result()
    return server, loop, f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def _verdict_reply(v: wire.VerdictMsg) -> Callable[[wire.Welcome, wire.Message], list[bytes]]:
    def reply(w: wire.Welcome, msg: wire.Message) -> list[bytes]:
        return [wire.encode(v, session=w.session_id)] if isinstance(msg, wire.Draft) else []
    return reply


@pytest.mark.parametrize("case", ["welcome-size", "welcome-gamma", "welcome-eos", "bonus-id", "bonus-count",
                                  "correction-at-gamma", "candidates-count", "full-row-size", "full-row-nan",
                                  "tokens-id", "wrong-session"])
def test_a_hostile_edge_is_a_clear_protocol_error(case, drafter):  # noqa: ANN001
    n, fp = drafter.n_vocab, vocab_fingerprint(drafter.vocab_tokens())
    welcome = None
    sampled = SamplingParams(1.0, top_k=8)
    cfg = GenerationConfig(sampling=GREEDY, gamma=2, max_new_tokens=16, pipeline=False, fallback=True)
    reply = _verdict_reply(wire.VerdictMsg(VerdictKind.BONUS, 2, 1))
    if case == "welcome-size":
        welcome = wire.Welcome(7, "h", fp, n + 1, (0,), 8, 512, 256, ("auto",))
    elif case == "welcome-gamma":
        welcome = wire.Welcome(7, "h", fp, n, (0,), 100_000, 512, 256, ("auto",))
    elif case == "welcome-eos":
        welcome = wire.Welcome(7, "h", fp, n, (n + 3,), 8, 512, 256, ("auto",))
    elif case == "bonus-id":
        reply = _verdict_reply(wire.VerdictMsg(VerdictKind.BONUS, 2, n + 10))
    elif case == "bonus-count":
        reply = _verdict_reply(wire.VerdictMsg(VerdictKind.BONUS, 9, 1))
    elif case == "correction-at-gamma":
        reply = _verdict_reply(wire.VerdictMsg(VerdictKind.CORRECTION, 2, 1))
    elif case == "candidates-count":
        cfg = GenerationConfig(sampling=sampled, gamma=2, max_new_tokens=16, pipeline=False, downlink="candidates",
                               n_candidates=2)
        reply = _verdict_reply(wire.VerdictMsg(VerdictKind.RESAMPLE, 0, p_ids=np.arange(50, dtype=np.int32),
                                               p_values=np.full(50, 0.01, np.float32), candidates=True))
    elif case == "full-row-size":
        cfg = GenerationConfig(sampling=sampled, gamma=2, max_new_tokens=16, pipeline=False, downlink="full")
        reply = _verdict_reply(wire.VerdictMsg(VerdictKind.RESAMPLE, 0, p_full=np.full(n // 2, 1.0, np.float32)))
    elif case == "full-row-nan":
        cfg = GenerationConfig(sampling=sampled, gamma=2, max_new_tokens=16, pipeline=False, downlink="full")
        reply = _verdict_reply(wire.VerdictMsg(VerdictKind.RESAMPLE, 0, p_full=np.full(n, np.nan, np.float32)))
    elif case == "tokens-id":
        cfg = GenerationConfig(mode="edge-only", sampling=GREEDY, max_new_tokens=16)

        def reply(w: wire.Welcome, msg: wire.Message) -> list[bytes]:
            if isinstance(msg, wire.Start):
                return [wire.encode(wire.Tokens(np.array([-5], np.int32)), session=w.session_id)]
            return []
    elif case == "wrong-session":
        def reply(w: wire.Welcome, msg: wire.Message) -> list[bytes]:
            return [wire.encode(wire.VerdictMsg(VerdictKind.BONUS, 2, 1), session=99)] \
                if isinstance(msg, wire.Draft) else []
    server, loop, url = _scripted_edge(reply, welcome, n, fp)
    emitted: list[int] = []
    try:
        client = DeviceClient(drafter, url)
        with pytest.raises(wire.WireError, match="the edge sent an invalid|session 99"):
            _generate(client, [5, 6, 7], cfg, lambda ids, text, verified: emitted.extend(ids))
    finally:
        server.close()
        loop.call_soon_threadsafe(loop.stop)
    assert emitted == []  # nothing from a hostile edge reached the user


def test_fallback_is_opt_in_marked_per_token_and_reported_in_the_exit_status(tiny_pair, tiny_edge):  # noqa: ANN001
    """The edge accepts the request, then its connection drops after the second Draft and it
    never comes back. Without --fallback: exit 1. With it: draft text between the markers,
    per-token flags in --json, exit status 3."""
    port = int(tiny_edge.url.rsplit(":", 1)[1])
    args = ["--model", str(tiny_pair.draft_gguf), "--threads", "1", "-n", "24", "-t", "0", "--gamma", "2",
            "--prompt", PROMPT]
    with FrameDropProxy(port, drop_after=4, stay_down=True) as proxy:
        out = _cli("--edge", f"ws://127.0.0.1:{proxy.port}", *args)
    assert out.returncode == EXIT_ERROR and "lost the edge" in out.stderr, out.stderr
    with FrameDropProxy(port, drop_after=4, stay_down=True) as proxy:
        out = _cli("--edge", f"ws://127.0.0.1:{proxy.port}", "--fallback", *args)
    assert out.returncode == EXIT_UNVERIFIED, out.stderr
    assert out.stdout.startswith(PROMPT) and UNVERIFIED_OPEN in out.stdout and UNVERIFIED_CLOSE in out.stdout
    assert "NOT VERIFIED" in out.stderr
    with FrameDropProxy(port, drop_after=4, stay_down=True) as proxy:
        out = _cli("--edge", f"ws://127.0.0.1:{proxy.port}", "--fallback", "--json", *args)
    doc = json.loads(out.stdout)
    assert out.returncode == EXIT_UNVERIFIED and not doc["exact"]
    flags = doc["verified"]
    assert flags[0] and not flags[-1] and flags.count(False) == doc["stats"]["unverified_tokens"] > 0


def test_served_fallback_chunks_say_they_are_unverified(tiny_pair, tiny_edge):  # noqa: ANN001
    port = int(tiny_edge.url.rsplit(":", 1)[1])
    with FrameDropProxy(port, drop_after=4, stay_down=True) as proxy:
        http_port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "device_runtime", "serve", "--edge", f"ws://127.0.0.1:{proxy.port}", "--model",
             str(tiny_pair.draft_gguf), "--threads", "1", "--port", str(http_port), "--fallback"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            assert "ready" in proc.stdout.readline()
            body = json.dumps({"model": Path(tiny_pair.draft_gguf).stem, "prompt": PROMPT, "max_tokens": 24,
                               "temperature": 0, "gamma": 2, "stream": True}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            events = [line[6:] for line in urllib.request.urlopen(req, timeout=120).read().decode().splitlines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    chunks = [json.loads(e) for e in events]
    text_chunks = [c for c in chunks if c.get("choices") and c["choices"][0]["text"]]
    flagged = [c for c in text_chunks if c.get("dssd", {}).get("verified") is False]
    assert 0 < len(flagged) < len(text_chunks)  # verified text first, then flagged draft text
    final = chunks[-1]["dssd"]
    assert final["exact"] is False and final["unverified_tokens"] > 0


def test_an_internal_error_that_repeats_is_final_even_with_fallback(drafter):  # noqa: ANN001
    """INTERNAL once: reconnect and resume. INTERNAL again: an error, never draft text."""
    n, fp = drafter.n_vocab, vocab_fingerprint(drafter.vocab_tokens())
    drafts = [0]

    def reply(w: wire.Welcome, msg: wire.Message) -> list[bytes]:
        if isinstance(msg, wire.Draft):
            drafts[0] += 1
            return [wire.encode(wire.Error(int(ErrorCode.INTERNAL), "internal error on the edge"))]
        return []

    server, loop, url = _scripted_edge(reply, None, n, fp)
    emitted: list[int] = []
    try:
        client = DeviceClient(drafter, url)
        with pytest.raises(EdgeError) as err:
            _generate(client, [5, 6, 7], GenerationConfig(sampling=GREEDY, gamma=2, max_new_tokens=16,
                                                          pipeline=False, fallback=True),
                      lambda ids, text, verified: emitted.extend(ids))
    finally:
        server.close()
        loop.call_soon_threadsafe(loop.stop)
    assert err.value.code == ErrorCode.INTERNAL and drafts[0] == 2 and emitted == []
