"""Link emulator: an asyncio TCP proxy on loopback that delays and rate-limits real bytes.

    device ──TCP──▶ [listen port] ─ up: token bucket (R_up) ─ one-way delay (+ jitter) ─▶ edge
    device ◀─TCP── [listen port] ◀─ one-way delay (+ jitter) ─ down: token bucket (R_down) ─ edge

The WebSocket bytes between device and edge really pay the serialisation cost n / R and
the propagation delay: nothing is simulated with sleep() in the protocol code. Per
direction and per connection:

* **Bandwidth**: a token bucket in virtual time. A piece of n bytes that reaches the
  link at time t leaves at max(t, previous departure) + max(0, n - bucket) / R; the
  bucket refills at R up to `burst_bytes` (default 0: a plain serialising link, every
  byte pays 1/R). Bytes are cut into pieces of at most `piece_bytes` so long messages
  arrive progressively, like packets.
* **Delay**: each piece is delivered at departure + one-way delay (+ uniform jitter in
  [-jitter, +jitter]), never before the previous piece: jitter never reorders bytes.
* Times are absolute (virtual clock), so timer overshoot never accumulates.

Runs in its own thread with its own event loop (`LinkEmulator`), because the device
runtime blocks its event loop while llama.cpp drafts. Usable as a context manager:

    with LinkEmulator.for_url(edge.url, LinkProfile.from_mbps(1, rtt_ms=50)) as link:
        client = DeviceClient(drafter, link.url)

or standalone: `python -m benchmarks.link --target 127.0.0.1:8765 --port 9000 --mbps 10 --rtt-ms 20`.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import random
import sys
import threading
from dataclasses import dataclass
from urllib.parse import urlparse

from protocol.costmodel import Link, mbps

log = logging.getLogger(__name__)

#: Largest piece shaped and delivered at once (about three Ethernet frames).
PIECE_BYTES = 4096


@dataclass(frozen=True)
class LinkProfile:
    """One emulated link. Rates in bytes/s (math.inf: unlimited); delays in seconds."""

    name: str = "custom"
    delay_up_s: float = 0.0  # one-way, device -> edge
    delay_down_s: float = 0.0  # one-way, edge -> device
    up_bytes_per_s: float = math.inf
    down_bytes_per_s: float = math.inf
    jitter_s: float = 0.0  # uniform in [-jitter, +jitter] per piece, order preserved
    burst_bytes: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.delay_up_s, self.delay_down_s, self.jitter_s, self.burst_bytes) < 0:
            raise ValueError("delays, jitter and burst must be >= 0")
        if self.up_bytes_per_s <= 0 or self.down_bytes_per_s <= 0:
            raise ValueError("rates must be positive (math.inf for unlimited)")

    @classmethod
    def from_mbps(cls, up_mbps: float | None = None, down_mbps: float | None = None, *, rtt_ms: float = 0.0,
                  jitter_ms: float = 0.0, burst_bytes: float = 0.0, name: str | None = None) -> "LinkProfile":
        """Rates in megabits/s (None: unlimited; down defaults to up); RTT split evenly."""
        if down_mbps is None:
            down_mbps = up_mbps
        up = math.inf if up_mbps is None else mbps(up_mbps)
        down = math.inf if down_mbps is None else mbps(down_mbps)
        if name is None:
            name = f"{_fmt(up_mbps)}mbps-{_fmt(rtt_ms)}ms" if up_mbps == down_mbps else (
                f"{_fmt(up_mbps)}/{_fmt(down_mbps)}mbps-{_fmt(rtt_ms)}ms")
        half = rtt_ms / 2000.0
        return cls(name, half, half, up, down, jitter_ms / 1000.0, burst_bytes)

    @property
    def rtt_s(self) -> float:
        return self.delay_up_s + self.delay_down_s

    @property
    def up_mbps(self) -> float:
        return self.up_bytes_per_s * 8 / 1e6

    @property
    def down_mbps(self) -> float:
        return self.down_bytes_per_s * 8 / 1e6

    @property
    def is_transparent(self) -> bool:
        """No delay, no rate limit: a proxy would only add its own overhead."""
        return (self.rtt_s == 0 and self.jitter_s == 0 and math.isinf(self.up_bytes_per_s)
                and math.isinf(self.down_bytes_per_s))

    def as_cost_link(self) -> Link:
        return Link(self.rtt_s, self.up_bytes_per_s, self.down_bytes_per_s)


def _fmt(x: float | None) -> str:
    if x is None:
        return "inf"
    return f"{x:g}"


class _Shaper:
    """Token bucket + delay for one direction of one connection (virtual time)."""

    def __init__(self, rate: float, delay: float, jitter: float, burst: float, rng: random.Random) -> None:
        self.rate = rate
        self.delay = delay
        self.jitter = jitter
        self.burst = burst
        self.rng = rng
        self.level = burst
        self.t_last = -math.inf  # departure time of the previous piece
        self.last_due = 0.0

    def due(self, n: int, now: float) -> float:
        """When a piece of n bytes reaching the link at `now` is delivered at the far end."""
        if math.isinf(self.rate):
            depart = now
        else:
            t0 = max(now, self.t_last)
            if self.t_last > -math.inf:
                self.level = min(self.burst, self.level + (t0 - self.t_last) * self.rate)
            if self.level >= n:
                depart = t0
                self.level -= n
            else:
                depart = t0 + (n - self.level) / self.rate
                self.level = 0.0
            self.t_last = depart
        due = depart + self.delay
        if self.jitter:
            due = max(depart, due + self.rng.uniform(-self.jitter, self.jitter))
        due = max(due, self.last_due)  # never reorder
        self.last_due = due
        return due


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, shaper: _Shaper,
                piece_bytes: int, counter: list[int]) -> None:
    """Copy one direction through the shaper: read as it arrives, deliver on schedule."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            item = await queue.get()
            if item is None:
                break
            due, data = item
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            counter[0] += len(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    task = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            now = loop.time()
            for i in range(0, len(data), piece_bytes):
                piece = data[i : i + piece_bytes]
                queue.put_nowait((shaper.due(len(piece), now), piece))
    except (ConnectionError, OSError):
        pass
    finally:
        queue.put_nowait(None)
    try:
        await task
    except (ConnectionError, OSError):
        pass


class AsyncLinkProxy:
    """The proxy on the current event loop (see `LinkEmulator` for the threaded form)."""

    def __init__(self, target_host: str, target_port: int, profile: LinkProfile, *,
                 host: str = "127.0.0.1", port: int = 0, piece_bytes: int = PIECE_BYTES) -> None:
        self.target = (target_host, target_port)
        self.profile = profile
        self.host = host
        self.port = port
        self.piece_bytes = piece_bytes
        self.bytes_up = [0]
        self.bytes_down = [0]
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._rng = random.Random(profile.seed)
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.connections += 1
        p = self.profile
        try:
            e_reader, e_writer = await asyncio.open_connection(*self.target)
        except OSError as exc:
            log.warning("link emulator: cannot reach %s:%d: %s", *self.target, exc)
            c_writer.close()
            return
        up = _Shaper(p.up_bytes_per_s, p.delay_up_s, p.jitter_s, p.burst_bytes, self._rng)
        down = _Shaper(p.down_bytes_per_s, p.delay_down_s, p.jitter_s, p.burst_bytes, self._rng)
        try:
            await asyncio.gather(
                _pump(c_reader, e_writer, up, self.piece_bytes, self.bytes_up),
                _pump(e_reader, c_writer, down, self.piece_bytes, self.bytes_down),
            )
        finally:
            for w in (c_writer, e_writer):
                w.close()
            if task is not None:
                self._tasks.discard(task)


class LinkEmulator:
    """`AsyncLinkProxy` on its own event loop in a daemon thread; a context manager.

    `url` is the ws:// URL to give the device instead of the edge's own.
    """

    def __init__(self, target_host: str, target_port: int, profile: LinkProfile, *,
                 host: str = "127.0.0.1", port: int = 0, piece_bytes: int = PIECE_BYTES) -> None:
        self.proxy = AsyncLinkProxy(target_host, target_port, profile, host=host, port=port,
                                    piece_bytes=piece_bytes)
        self.profile = profile
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="link-emulator", daemon=True)
        self.url = ""

    @classmethod
    def for_url(cls, edge_url: str, profile: LinkProfile, **kwargs) -> "LinkEmulator":  # noqa: ANN003
        u = urlparse(edge_url)
        if u.hostname is None or u.port is None:
            raise ValueError(f"need ws://HOST:PORT, got {edge_url!r}")
        return cls(u.hostname, u.port, profile, **kwargs)

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def bytes_up(self) -> int:
        return self.proxy.bytes_up[0]

    @property
    def bytes_down(self) -> int:
        return self.proxy.bytes_down[0]

    def start(self) -> "LinkEmulator":
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self.proxy.start(), self._loop).result(timeout=30)
        self.url = f"ws://{self.proxy.host}:{port}"
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.proxy.close(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def __enter__(self) -> "LinkEmulator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def profile_from_args(args: argparse.Namespace) -> LinkProfile:
    up = args.up_mbps if args.up_mbps is not None else args.mbps
    down = args.down_mbps if args.down_mbps is not None else args.mbps
    rtt = args.rtt_ms if args.delay_ms is None else 2 * args.delay_ms
    return LinkProfile.from_mbps(up, down, rtt_ms=rtt, jitter_ms=args.jitter_ms, burst_bytes=args.burst_bytes)


def add_link_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mbps", type=float, default=None, help="rate both ways, megabits/s (default unlimited)")
    p.add_argument("--up-mbps", type=float, default=None, help="device -> edge rate (overrides --mbps)")
    p.add_argument("--down-mbps", type=float, default=None, help="edge -> device rate (overrides --mbps)")
    p.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time, split evenly per direction")
    p.add_argument("--delay-ms", type=float, default=None, help="one-way delay (overrides --rtt-ms)")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="uniform jitter per piece, order preserved")
    p.add_argument("--burst-bytes", type=float, default=0.0, help="token-bucket depth (0: serialise every byte)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.link",
                                description="TCP proxy that emulates a link (delay, bandwidth, jitter).")
    p.add_argument("--target", required=True, help="HOST:PORT of the edge")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="listen port (0: any free port)")
    add_link_arguments(p)
    args = p.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    profile = profile_from_args(args)

    async def serve() -> None:
        proxy = AsyncLinkProxy(host or "127.0.0.1", int(port), profile, host=args.host, port=args.port)
        bound = await proxy.start()
        print(f"link emulator ready on ws://{args.host}:{bound} -> {args.target} ({profile.name})", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await proxy.close()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
