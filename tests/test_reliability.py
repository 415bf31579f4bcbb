"""Reliability and security: lost edges, dropped rounds, hostile clients, access control, TLS.

Real edge (in-process server thread or a real `python -m edge_service` process), real
llama.cpp device, real WebSocket connections on loopback.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from device_runtime.drafter import LlamaDrafter
from device_runtime.session import DeviceClient, GenerationConfig
from device_runtime.transport import EdgeError, EdgeUnreachable
from edge_service.server import EdgeServerThread, ServerConfig
from edge_service.session import EdgeLimits
from protocol import wire
from protocol.sampling import SamplingParams
from protocol.vocab import vocab_fingerprint
from protocol.wire import ErrorCode
from tests.test_end_to_end import reference_greedy

GREEDY = SamplingParams(0.0)
PROMPT = "The cat sat on the"


@pytest.fixture(scope="module")
def drafter(tiny_pair) -> LlamaDrafter:  # noqa: ANN001
    d = LlamaDrafter(tiny_pair.draft_gguf, n_ctx=512, n_threads=1, f32_kv_cache=True)
    yield d
    d.close()


def _generate(client: DeviceClient, ids: list[int], config: GenerationConfig, on_tokens=None):  # noqa: ANN001, ANN202
    async def go():  # noqa: ANN202
        try:
            return await client.generate(ids, config, on_tokens)
        finally:
            await client.close()

    return asyncio.run(go())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_edge_process(model: Path, port: int) -> subprocess.Popen:
    """A real `python -m edge_service` process; returns once it says it is ready."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_service", "--model", str(model), "--port", str(port), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    line = proc.stdout.readline()
    assert "ready" in line, line
    return proc


# -- the edge dies and comes back ------------------------------------------------------------


@pytest.mark.slow
def test_edge_killed_mid_generation_falls_back_then_resumes_exact(tiny_pair, tiny_target, drafter):  # noqa: ANN001
    port = _free_port()
    edge = _start_edge_process(tiny_pair.target_gguf, port)
    ids = drafter.tokenize(PROMPT, add_bos=False)
    restarted: dict[str, subprocess.Popen] = {}
    ready = threading.Event()

    def on_tokens(new: list[int], text: str, verified: bool) -> None:
        n = len(progress) + len(new)
        progress.extend(new)
        if n >= 10 and edge.poll() is None:
            edge.send_signal(signal.SIGKILL)  # the edge dies mid-generation
            edge.wait()

            def restart() -> None:
                restarted["p"] = _start_edge_process(tiny_pair.target_gguf, port)
                ready.set()

            threading.Thread(target=restart, daemon=True).start()
        if not verified:  # a slow device: the edge has time to come back before the end
            if not ready.wait(0.5):
                return
            time.sleep(0.03)

    progress: list[int] = []
    config = GenerationConfig(mode="dssd", max_new_tokens=420, sampling=GREEDY, gamma=3, max_backoff_s=1.0,
                              round_timeout_s=5.0, fallback=True)
    client = DeviceClient(drafter, f"ws://127.0.0.1:{port}")
    try:
        result = _generate(client, ids, config, on_tokens)
        flags = result.verified
        first_bad = flags.index(False)
        resumed = first_bad + flags[first_bad:].index(True)
        assert result.stats.fallback_events >= 1 and result.stats.reconnects >= 1
        assert result.stats.unverified_tokens == flags.count(False) > 0
        assert not result.exact
        # the verified prefix is the target's greedy output
        want = reference_greedy(tiny_target, ids, first_bad)
        assert result.ids[:first_bad] == want[:first_bad]
        # after the edge came back: exact again, from everything committed (no loss, no duplicate)
        tail = result.ids[resumed:]
        ref_tail = reference_greedy(tiny_target, ids + result.ids[:resumed], len(tail))
        assert all(flags[resumed:]) and tail == ref_tail[: len(tail)]
        # the next request is exact from the start
        client2 = DeviceClient(drafter, f"ws://127.0.0.1:{port}")
        again = _generate(client2, ids, GenerationConfig(mode="dssd", max_new_tokens=48, sampling=GREEDY))
        assert again.exact and again.ids == reference_greedy(tiny_target, ids, 48)
    finally:
        for p in (edge, restarted.get("p")):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(timeout=30)


def test_no_fallback_fails_clearly(drafter):  # noqa: ANN001
    client = DeviceClient(drafter, f"ws://127.0.0.1:{_free_port()}")
    with pytest.raises(ConnectionError):
        _generate(client, [5, 6, 7], GenerationConfig(sampling=GREEDY, fallback=False))


def test_unreachable_edge_is_an_error_even_with_fallback(drafter):  # noqa: ANN001
    """Fallback is for an edge lost mid-request: an edge never reached is a configuration error."""
    client = DeviceClient(drafter, f"ws://127.0.0.1:{_free_port()}")
    emitted: list[int] = []
    with pytest.raises(EdgeUnreachable, match="connection refused"):
        _generate(client, [5, 6, 7], GenerationConfig(sampling=GREEDY, max_new_tokens=24, fallback=True),
                  lambda ids, text, verified: emitted.extend(ids))
    assert emitted == []


# -- a connection dropped between uplink and downlink -----------------------------------------


class DropProxy:
    """TCP proxy on loopback that kills its first connection right after forwarding the
    `drop_after`-th client chunk upstream, before the server's answer comes back."""

    def __init__(self, upstream_port: int, drop_after: int) -> None:
        self.upstream_port, self.drop_after = upstream_port, drop_after
        self.dropped = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _pipe(self, reader, writer, count: bool, peer_writer) -> None:  # noqa: ANN001
        n = 0
        try:
            while data := await reader.read(65536):
                if self.dropped is False and count:
                    n += 1
                    writer.write(data)
                    await writer.drain()
                    if n == self.drop_after:
                        self.dropped = True
                        writer.transport.abort()
                        peer_writer.transport.abort()
                        return
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _client(self, reader, writer) -> None:  # noqa: ANN001
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        first = not self.dropped
        await asyncio.gather(
            self._pipe(reader, up_writer, first, writer),
            self._pipe(up_reader, writer, False, up_writer),
        )

    def __enter__(self) -> "DropProxy":
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, "127.0.0.1", 0), self._loop
        ).result()
        self.port = server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)


def test_connection_dropped_between_uplink_and_downlink_loses_nothing(tiny_target, tiny_edge, drafter):  # noqa: ANN001
    """Chunks: 1 = HTTP upgrade, 2 = Hello, 3 = Start, 4.. = Drafts: drop right after a Draft."""
    ids = drafter.tokenize(PROMPT, add_bos=False)
    port = int(tiny_edge.url.rsplit(":", 1)[1])
    with DropProxy(port, drop_after=6) as proxy:
        client = DeviceClient(drafter, f"ws://127.0.0.1:{proxy.port}")
        res = _generate(client, ids, GenerationConfig(mode="dssd", max_new_tokens=64, sampling=GREEDY, gamma=3))
        assert proxy.dropped
    assert res.stats.reconnects == 1 and res.exact
    assert res.ids == reference_greedy(tiny_target, ids, 64)


# -- hostile clients ----------------------------------------------------------------------------


def _hostile_cases(fingerprint: str, n_vocab: int, rng: np.random.Generator, n: int):  # noqa: ANN202
    """(handshake_first, frame) pairs: raw garbage, and semantic attacks inside a session."""
    q = np.full(3, 0.5, np.float32)
    good_draft = wire.Draft(6, np.zeros(0, np.int32), np.array([1, 2, 3], np.int32), q_draft=q)
    semantic = [
        wire.encode(wire.Draft(6, np.zeros(0, np.int32), np.arange(40, dtype=np.int32) % 50,
                               q_draft=np.full(40, 0.5, np.float32)), session=1),  # gamma over the cap
        wire.encode(wire.Draft(6, np.zeros(0, np.int32), np.array([1, n_vocab + 5, 3], np.int32), q_draft=q)),
        wire.encode(wire.Draft(6, np.zeros(0, np.int32), np.array([1, 2, 3], np.int32),
                               q_draft=np.array([0.5, np.nan, 0.5], np.float32))),
        wire.encode(wire.Draft(6, np.zeros(0, np.int32), np.array([1, 2, 3], np.int32),
                               q_draft=np.array([0.5, -1.0, 0.5], np.float32))),
        wire.encode(wire.Draft(6, np.zeros(0, np.int32), np.array([1, 2, 3], np.int32),
                               q_draft=np.array([0.0, 0.5, 0.5], np.float32))),
        wire.encode(wire.Draft(999, np.zeros(0, np.int32), np.array([1, 2, 3], np.int32), q_draft=q)),
        wire.encode(wire.Hello(1, fingerprint, n_vocab)),  # hello twice
        wire.encode(wire.More(3)),  # no candidates pending
        wire.encode(wire.Draft(6, np.zeros(0, np.int32), np.array([1, 2, 3], np.int32), q_draft=q), session=77),
    ]
    valid = wire.encode(good_draft)
    for i in range(n):
        kind = i % 6
        if kind == 0:
            yield False, rng.integers(0, 256, int(rng.integers(0, 80)), dtype=np.uint8).tobytes()
        elif kind == 1:
            yield False, valid[: int(rng.integers(0, len(valid)))]  # truncated
        elif kind == 2:
            yield False, valid[:2] + bytes([7]) + valid[3:]  # wrong version
        elif kind == 3:
            yield False, valid + bytes(70_000)  # oversized for this server
        elif kind == 4:
            yield False, "a text frame"
        else:
            frame = bytearray(semantic[(i // 6) % len(semantic)])
            if not struct.unpack_from("<I", frame, 4)[0]:
                struct.pack_into("<I", frame, 4, 1)  # patched to the real session id below
            yield True, bytes(frame)


@pytest.mark.slow
def test_ten_thousand_hostile_frames_while_a_good_session_completes(tiny_target, drafter):  # noqa: ANN001
    config = ServerConfig(port=0, max_sessions=256,
                          limits=EdgeLimits(max_gamma=8, max_frame_bytes=65536))
    fingerprint = vocab_fingerprint(tiny_target.vocab_tokens)
    hello = wire.encode(wire.Hello(1, fingerprint, tiny_target.n_vocab))
    ids = drafter.tokenize(PROMPT, add_bos=False)
    start = wire.encode(wire.Start("dssd", SamplingParams(1.0), 0, 16, np.array([5, 6, 7, 8, 9, 10], np.int32)))
    outcomes = {"error": 0, "closed": 0, "silent": 0}

    async def attack(url: str, handshake: bool, frame: bytes) -> None:
        try:
            async with connect(url, compression=None, max_size=2**20, open_timeout=30) as ws:
                if handshake:
                    await ws.send(hello)
                    welcome = wire.decode(await ws.recv()).message
                    assert isinstance(welcome, wire.Welcome)
                    await ws.send(start)
                    frame = bytearray(frame)
                    if struct.unpack_from("<I", frame, 4)[0] == 1:
                        struct.pack_into("<I", frame, 4, welcome.session_id)
                    frame = bytes(frame)
                await ws.send(frame)
                reply = await asyncio.wait_for(ws.recv(), 30)
                msg = wire.decode(reply).message
                outcomes["error" if isinstance(msg, wire.Error) else "silent"] += 1
        except ConnectionClosed:
            outcomes["closed"] += 1

    async def main(url: str) -> list[int]:
        client = DeviceClient(drafter, url)
        cases = list(_hostile_cases(fingerprint, tiny_target.n_vocab, np.random.default_rng(0), 10_000))
        sem = asyncio.Semaphore(16)

        async def bounded(case) -> None:  # noqa: ANN001
            async with sem:
                await attack(url, *case)

        good = asyncio.create_task(client.generate(ids, GenerationConfig(mode="dssd", max_new_tokens=64,
                                                                           sampling=GREEDY, fallback=False)))
        await asyncio.gather(*(bounded(c) for c in cases))
        result = await good
        await client.close()
        return result.ids

    with EdgeServerThread(tiny_target, config) as edge:
        got = asyncio.run(main(edge.url))
        health = json.loads(urllib.request.urlopen(edge.url.replace("ws://", "http://") + "/health").read())
        assert health["status"] == "ok" and health["sessions"] == 0
    assert got == reference_greedy(tiny_target, ids, 64)
    assert outcomes["silent"] == 0 and outcomes["error"] + outcomes["closed"] == 10_000, outcomes


def test_busy_counts_authenticated_sessions_and_handshake_timeout(tiny_target, drafter):  # noqa: ANN001
    config = ServerConfig(port=0, max_sessions=1, handshake_timeout_s=0.5)
    hello = wire.encode(wire.Hello(wire.VERSION, vocab_fingerprint(tiny_target.vocab_tokens), tiny_target.n_vocab))
    with EdgeServerThread(tiny_target, config) as edge:

        async def go() -> tuple[object, object, object]:
            async with connect(edge.url) as silent, connect(edge.url) as first, connect(edge.url) as second:
                await first.send(hello)
                welcome = wire.decode(await first.recv()).message
                await second.send(hello)
                busy = wire.decode(await second.recv()).message
                timed_out = wire.decode(await silent.recv()).message  # sent nothing: timed out
                return welcome, busy, timed_out

        welcome, busy, timed_out = asyncio.run(go())
    assert isinstance(welcome, wire.Welcome)  # the silent socket did not take the only slot
    assert isinstance(busy, wire.Error) and busy.code == ErrorCode.BUSY
    assert isinstance(timed_out, wire.Error) and "handshake timeout" in timed_out.message


# -- access control and TLS -------------------------------------------------------------------


def _self_signed(tmp: Path) -> tuple[str, str]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    return str(cert), str(key)


def test_token_required_and_wss_with_self_signed_certificate(tmp_path, tiny_target, drafter):  # noqa: ANN001
    cert, key = _self_signed(tmp_path)
    config = ServerConfig(port=0, auth_tokens=frozenset({"s3cret", "other"}), tls_cert=cert, tls_key=key)
    ids = drafter.tokenize(PROMPT, add_bos=False)
    trust = ssl.create_default_context(cafile=cert)
    with EdgeServerThread(tiny_target, config) as edge:
        assert edge.url.startswith("wss://")
        for token in ("", "wrong"):
            client = DeviceClient(drafter, edge.url, auth_token=token, ssl_context=trust)
            with pytest.raises(EdgeError) as err:
                _generate(client, ids, GenerationConfig(sampling=GREEDY, fallback=False))
            assert err.value.code == ErrorCode.AUTH
        client = DeviceClient(drafter, edge.url, auth_token="s3cret", ssl_context=trust)
        res = _generate(client, ids, GenerationConfig(sampling=GREEDY, max_new_tokens=32, fallback=False))
        assert res.ids == reference_greedy(tiny_target, ids, 32)
        untrusted = DeviceClient(drafter, edge.url, auth_token="s3cret")  # system CAs only
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            _generate(untrusted, ids, GenerationConfig(sampling=GREEDY, fallback=False))
