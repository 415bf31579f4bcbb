"""The link emulator really delays and rate-limits bytes, per direction, without reordering them.

Timing checks are lower bounds only (a loaded machine can only make transfers slower),
with a loose sanity ceiling; the shaping arithmetic itself is checked in virtual time.
"""
from __future__ import annotations

import asyncio
import math
import os
import random
import socket
import threading
import time
from typing import Iterator

import pytest

from benchmarks.link import LinkEmulator, LinkProfile, _Shaper
from protocol.costmodel import mbps


class _Peer:
    """A TCP server in its own thread: 'U<n>' reads n bytes then acks; 'D<n>' sends n bytes; 'E<n>' echoes n."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen()
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    @staticmethod
    def _session(conn: socket.socket) -> None:
        with conn:
            f = conn.makefile("rb")
            while True:
                line = f.readline()
                if not line:
                    return
                op, n = line[:1], int(line[1:])
                if op == b"U":
                    f.read(n)
                    conn.sendall(b"!")
                elif op == b"D":
                    conn.sendall(os.urandom(n))
                elif op == b"E":
                    conn.sendall(f.read(n))

    def close(self) -> None:
        self._sock.close()


@pytest.fixture(scope="module")
def peer() -> Iterator[_Peer]:
    p = _Peer()
    yield p
    p.close()


def _connect(link: LinkEmulator) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", link.port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, "connection closed early"
        buf += chunk
    return bytes(buf)


def test_upload_takes_at_least_n_over_r(peer: _Peer) -> None:
    n, rate = 60_000, 200_000.0  # 0.3 s of serialisation
    profile = LinkProfile("up", up_bytes_per_s=rate)
    with LinkEmulator("127.0.0.1", peer.port, profile) as link, _connect(link) as s:
        t0 = time.perf_counter()
        s.sendall(b"U%d\n" % n + bytes(n))
        assert _recv_exactly(s, 1) == b"!"
        elapsed = time.perf_counter() - t0
    assert elapsed >= 0.95 * n / rate
    assert elapsed < 20 * n / rate + 10  # sanity only: it did not hang
    assert link.bytes_up >= n


def test_download_takes_at_least_n_over_r_and_directions_are_independent(peer: _Peer) -> None:
    n, rate = 60_000, 200_000.0
    profile = LinkProfile("down", down_bytes_per_s=rate)  # uplink unlimited
    with LinkEmulator("127.0.0.1", peer.port, profile) as link, _connect(link) as s:
        t0 = time.perf_counter()
        s.sendall(b"D%d\n" % n)
        _recv_exactly(s, n)
        elapsed = time.perf_counter() - t0
    assert elapsed >= 0.95 * n / rate
    assert elapsed < 20 * n / rate + 10


def test_round_trip_pays_the_delay_both_ways(peer: _Peer) -> None:
    profile = LinkProfile.from_mbps(None, rtt_ms=80)
    assert profile.delay_up_s == profile.delay_down_s == pytest.approx(0.04)
    with LinkEmulator("127.0.0.1", peer.port, profile) as link, _connect(link) as s:
        for _ in range(3):
            t0 = time.perf_counter()
            s.sendall(b"E4\nping")
            assert _recv_exactly(s, 4) == b"ping"
            assert time.perf_counter() - t0 >= 0.95 * 0.08


def test_bytes_arrive_intact_and_in_order_under_jitter_and_rate(peer: _Peer) -> None:
    profile = LinkProfile.from_mbps(50, rtt_ms=10, jitter_ms=4)
    rng = random.Random(1)
    with LinkEmulator("127.0.0.1", peer.port, profile) as link, _connect(link) as s:
        for size in (1, 100, 5000, 70_000):
            data = bytes(rng.getrandbits(8) for _ in range(size))
            s.sendall(b"E%d\n" % size + data)
            assert _recv_exactly(s, size) == data


def test_websocket_through_the_link() -> None:
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    async def echo(ws) -> None:  # noqa: ANN001
        async for msg in ws:
            await ws.send(msg)

    async def go() -> float:
        async with serve(echo, "127.0.0.1", 0, compression=None) as server:
            port = server.sockets[0].getsockname()[1]
            profile = LinkProfile.from_mbps(1, rtt_ms=20)  # 125 kB/s each way
            with LinkEmulator("127.0.0.1", port, profile) as link:
                assert link.url.startswith("ws://127.0.0.1:")
                async with connect(link.url, compression=None, max_size=None) as ws:
                    payload = os.urandom(25_000)
                    t0 = time.perf_counter()
                    await ws.send(payload)
                    assert await ws.recv() == payload
                    return time.perf_counter() - t0

    # up and down each serialise 25 kB at 125 kB/s, plus one RTT
    assert asyncio.run(go()) >= 0.95 * (2 * 25_000 / 125_000 + 0.02)


# -- shaping arithmetic in virtual time (exact, no clocks) ----------------------------


def test_shaper_serialises_each_byte_without_burst() -> None:
    sh = _Shaper(rate=1000.0, delay=0.05, jitter=0.0, burst=0.0, rng=random.Random(0))
    dues = [sh.due(100, now=0.0) for _ in range(3)]
    assert dues == pytest.approx([0.15, 0.25, 0.35])
    # a piece arriving after the link went idle starts at its own arrival time
    assert sh.due(100, now=10.0) == pytest.approx(10.15)


def test_token_bucket_burst_then_rate() -> None:
    sh = _Shaper(rate=1000.0, delay=0.0, jitter=0.0, burst=500.0, rng=random.Random(0))
    assert sh.due(500, now=0.0) == pytest.approx(0.0)  # within the bucket: no wait
    assert sh.due(100, now=0.0) == pytest.approx(0.1)  # bucket empty: 100 bytes at 1000 B/s
    assert sh.due(400, now=1.0) == pytest.approx(1.0)  # refilled (capped at 500) after idling


def test_jitter_never_reorders_and_unlimited_rate_is_pure_delay() -> None:
    sh = _Shaper(rate=math.inf, delay=0.02, jitter=0.015, burst=0.0, rng=random.Random(3))
    dues = [sh.due(10, now=i * 0.001) for i in range(200)]
    assert dues == sorted(dues)
    assert all(d >= i * 0.001 for i, d in enumerate(dues))
    flat = _Shaper(rate=math.inf, delay=0.02, jitter=0.0, burst=0.0, rng=random.Random(0))
    assert flat.due(10**6, now=1.0) == pytest.approx(1.02)


def test_profile_units() -> None:
    p = LinkProfile.from_mbps(8, 80, rtt_ms=50)
    assert p.up_bytes_per_s == mbps(8) == 1e6
    assert p.down_bytes_per_s == 1e7
    assert p.rtt_s == pytest.approx(0.05)
    assert p.as_cost_link().rtt_s == pytest.approx(0.05)
    assert LinkProfile.from_mbps(None).is_transparent
    assert LinkProfile.from_mbps(10, rtt_ms=20).name == "10mbps-20ms"
    with pytest.raises(ValueError):
        LinkProfile("bad", up_bytes_per_s=0)
