"""WebSocket server: one `EdgeSession` per authenticated device connection.

The event loop only moves frames; all model work runs on one worker thread, so a slow
forward never stalls other connections' I/O and sessions never race on the model. A bad
frame or refused request gets an Error frame and a clean close of that connection only.

Admission is in two steps, so that a stranger costs next to nothing:

1. A new connection is *unauthenticated*: it holds no session slot, no model state and
   at most one small frame (`MAX_HELLO_BYTES`, a receive queue of 1). It has
   `handshake_timeout_s` to send an acceptable Hello. At most `max_unauthenticated` are
   held; one more closes the oldest of them.
2. Once the Hello passes (version, access token, vocabulary), the connection becomes a
   session: it counts against `max_sessions` (BUSY beyond; only authenticated sessions
   count) and its receive limits rise to the session's.

Draining (`drain()`, SIGTERM in `python -m edge_service`): the edge stops admitting
(new Hellos get SHUTDOWN, /health answers 503 so a balancer stops routing here), answers
every frame each session had already sent (a round in flight is finished, never cut),
then tells each device to go elsewhere (Error SHUTDOWN, WebSocket close code 1001), and
the device resumes exactly on another replica from what it committed.

Limits never count frames per second (a well-behaved client would be refused on a fast
enough machine). They bound what costs something: work (tokens prefilled and verified,
as a per-session budget that delays and never refuses), frames sent without waiting
for replies (a flood, refused), `More` requests per round and invalid frames (refused).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
import ssl
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any, Callable

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from dssd_common.loop_thread import ServerThread
from edge_service.backends.base import TargetModel
from edge_service.metrics import EdgeMetrics
from edge_service.scheduler import BatchConfig, VerifyScheduler
from edge_service.session import EdgeLimits, EdgeSession, ProtocolError
from protocol import wire
from protocol.affinity import key_of
from protocol.vocab import Vocabulary
from protocol.wire import ErrorCode

log = logging.getLogger(__name__)

#: Largest frame accepted before the Hello is (a Hello is a small JSON object; the access
#: token is its only free-size field). A larger one closes with WebSocket code 1009.
MAX_HELLO_BYTES = 8192
#: websockets' receive queue (frames) before and after the handshake.
_QUEUE_UNAUTHENTICATED = 1
_QUEUE_SESSION = 16
#: Put in a session's inbox by `drain()`: the frames before it are answered, then the
#: session is sent elsewhere.
_DRAIN = object()
#: Liveness: 200 while the process answers, draining included (/health is readiness).
LIVENESS_PATH = "/health/live"
#: WebSocket close code after an Error SHUTDOWN ("going away"): the device moves on.
CLOSE_GOING_AWAY = 1001


@dataclass
class DrainReport:
    """What a drain did (logged by `python -m edge_service` on exit; asserted by tests)."""

    sessions_moved: int = 0  # sessions told to go elsewhere (Error SHUTDOWN, close 1001)
    rounds_finished: int = 0  # Drafts/Mores received before the drain and answered after it
    hellos_refused: int = 0  # new sessions refused while draining
    timed_out: bool = False  # sessions were still open after the grace period


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    #: Authenticated sessions at once; BUSY beyond. Connections still in their handshake
    #: do not count, so strangers cannot make the edge busy for real devices.
    max_sessions: int = 64
    limits: EdgeLimits = field(default_factory=EdgeLimits)
    #: Shared access tokens; a device must present one in its Hello. Empty: no check.
    auth_tokens: frozenset[str] = frozenset()
    #: TLS (wss://): PEM certificate chain and private key.
    tls_cert: str | None = None
    tls_key: str | None = None
    #: Seconds a new connection has to send an acceptable Hello.
    handshake_timeout_s: float = 5.0
    #: Connections in their handshake held at once; one more closes the oldest of them
    #: (it had the most time to say Hello), so idle sockets cannot lock devices out.
    max_unauthenticated: int = 64
    idle_timeout_s: float = 300.0
    #: Frames a session may have sent without the replies to earlier ones. The protocol
    #: is request-reply: a client that waits never has more than 2 (Start and its first
    #: Draft) unanswered, at any speed. More is a flood and is refused (LIMIT).
    max_unanswered_frames: int = 4
    #: Work budget per session: tokens prefilled plus tokens verified, per second
    #: sustained, and the burst. Past it the session's next job is delayed, never
    #: refused: a fast client is slowed, and only beyond this rate. 0: unlimited.
    work_tokens_per_s: float = 100_000.0
    work_burst_tokens: int = 65_536
    #: Cross-session verification batching (edge_service/scheduler.py).
    batching: BatchConfig = field(default_factory=BatchConfig)
    #: Prometheus /metrics on this HTTP port (bound to `host`; 0: any free port). None: off.
    metrics_port: int | None = None
    #: Clock of the work budgets (a test passes a frozen one: an infinitely fast machine).
    clock: Callable[[], float] = time.monotonic
    #: This process's name in Welcomes, /health and logs, so operators and devices can tell
    #: replicas apart behind a balancer. "": HOSTNAME:PORT.
    replica_id: str = ""

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.max_unauthenticated < 1:
            raise ValueError("max_sessions and max_unauthenticated must be >= 1")
        if self.max_unanswered_frames < 2:
            raise ValueError("max_unanswered_frames must be >= 2 (Start and a Draft travel together)")
        if self.work_tokens_per_s < 0 or self.work_burst_tokens < 1:
            raise ValueError("work_tokens_per_s must be >= 0 and work_burst_tokens >= 1")


class WorkBudget:
    """Per-session work rate: a token bucket of *model tokens*, answered by a delay.

    `charge(n)` takes n tokens of work (prefill or verification) and returns how long
    the caller must wait before running it, so that the sustained rate stays under
    `rate` per second with bursts of `burst`. It never refuses.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst = float(rate), float(burst)
        self._clock = clock
        self._level = float(burst)  # tokens available now (negative: owed)
        self._t = clock()

    def charge(self, n: int) -> float:
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        self._level = min(self.burst, self._level + (now - self._t) * self.rate)
        self._t = now
        self._level -= n
        return 0.0 if self._level >= 0 else -self._level / self.rate


def work_of(session: EdgeSession, msg: wire.Message) -> int:
    """Model tokens a message makes the edge process (its charge against the work budget)."""
    if isinstance(msg, wire.Start):
        return int(msg.prompt_ids.size)
    if isinstance(msg, wire.Draft):
        return int(msg.prefix_ids.size + msg.draft_ids.size) + 1
    return 0


def _set_receive_limits(ws: ServerConnection, max_message: int, max_queue: int) -> None:
    """Raise websockets' receive limits of one connection once its Hello is accepted.

    websockets reads both per message (17: `max_message_size`; 15-16: `max_size`).
    """
    protocol = ws.protocol
    if hasattr(protocol, "max_message_size"):
        protocol.max_message_size = max_message
    else:  # pragma: no cover - websockets < 17
        protocol.max_size = max_message
    ws.recv_messages.high, ws.recv_messages.low = max_queue, max_queue // 4


class EdgeServer:
    """Accepts device connections and runs their sessions against one target model."""

    def __init__(self, model: TargetModel, config: ServerConfig) -> None:
        self.model = model
        self.config = config
        self._ids = itertools.count(1)
        self._connections: set[ServerConnection] = set()  # authenticated sessions
        self._unauthenticated: dict[ServerConnection, None] = {}  # insertion-ordered
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-model")
        self._server: Server | None = None
        self._closing = False
        self._draining = False
        self._inboxes: dict[ServerConnection, asyncio.Queue] = {}  # sessions being served
        self.drain_report = DrainReport()
        self.replica_id = config.replica_id
        self.scheme = "wss" if config.tls_cert else "ws"
        #: computed once per model, not per connection (a 262k vocabulary takes ~0.1 s)
        self.vocabulary = Vocabulary.of(model.vocab_tokens, model.n_vocab)
        self.fingerprint = self.vocabulary.fingerprint
        self.metrics = EdgeMetrics(active_sessions=lambda: len(self._connections))
        self.metrics_port: int | None = None  # bound /metrics port once started
        self.scheduler = VerifyScheduler(
            model, config.batching, self._run, metrics=self.metrics, active=lambda: len(self._connections)
        )

    @property
    def active_sessions(self) -> int:
        return len(self._connections)

    @property
    def pending_handshakes(self) -> int:
        return len(self._unauthenticated)

    @property
    def draining(self) -> bool:
        return self._draining

    def health(self) -> dict[str, Any]:
        return {
            "status": "closing" if self._closing else "draining" if self._draining else "ok",
            "replica": self.replica_id,
            "model": self.model.name,
            "sessions": self.active_sessions,
            "max_sessions": self.config.max_sessions,
            "pending_handshakes": self.pending_handshakes,
            "protocol_version": wire.VERSION,
        }

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.config.tls_cert:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        return ctx

    async def start(self) -> int:
        """Start listening; returns the bound port (useful with port 0)."""
        if not self.config.auth_tokens:
            if self.config.host in ("127.0.0.1", "localhost", "::1"):
                log.warning("no access token configured: serving loopback only (use --token to accept "
                            "remote devices)")
            else:
                log.warning("no access token configured and bound to %s: any client that reaches "
                            "this port can use the edge", self.config.host)
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            compression=None,
            max_size=MAX_HELLO_BYTES,  # raised per connection once its Hello is accepted
            max_queue=_QUEUE_UNAUTHENTICATED,
            ssl=self._ssl_context(),
            process_request=self._http,
        )
        port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self.config.port
        self.replica_id = self.replica_id or f"{socket.gethostname()}:{port}"
        log.info("edge %s serving %s on %s://%s:%d", self.replica_id, self.model.name, self.scheme,
                 self.config.host, port)
        if self.config.metrics_port is not None and self.metrics_port is None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.host)
        return port

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        """Plain HTTP GET /health on the WebSocket port, for orchestration: 200 while serving,
        503 while draining or closing (a balancer's health check then stops routing here).
        A new WebSocket upgrade while draining is answered 503 too (devices and balancers
        treat it like BUSY and go to another replica). `/health/live` answers 200 as long
        as the process serves, draining included (a liveness probe must not kill a drain)."""
        leaving = self._draining or self._closing
        if request.path in ("/health", LIVENESS_PATH):  # readiness, and liveness (200 while draining too)
            ready = not leaving or request.path == LIVENESS_PATH
            return connection.respond(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE,
                                      json.dumps(self.health()) + "\n")
        if leaving:  # refused before the upgrade, so a balancer can retry another replica at once
            self.drain_report.hellos_refused += self._draining and not self._closing
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "draining: connect to another replica\n")
        return None

    async def drain(self, grace_s: float = 30.0) -> DrainReport:
        """Stop admitting, finish what every session has in flight, send each device elsewhere.

        Returns once every session is gone, or after `grace_s` (then `timed_out`; `close()`
        ends the rest). Safe to call more than once.
        """
        if not self._draining:
            self._draining = True
            log.info("draining: %d sessions to move, no new sessions", len(self._connections))
            for inbox in self._inboxes.values():
                inbox.put_nowait(_DRAIN)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._connections and loop.time() < deadline:  # each session leaves at its next boundary
            await asyncio.sleep(0.05)
        self.drain_report.timed_out = bool(self._connections)
        return self.drain_report

    async def close(self, grace_s: float = 10.0) -> None:
        """Graceful shutdown: refuse new work, tell every device, close, never hang."""
        self._closing = True
        for ws in list(self._connections) + list(self._unauthenticated):
            await self._refuse(ws, ErrorCode.SHUTDOWN, "the edge is shutting down", timeout=grace_s)
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), grace_s)
            except asyncio.TimeoutError:
                log.warning("connections still open after %.0f s; exiting anyway", grace_s)
        await self.scheduler.close()
        self._worker.shutdown(wait=True)
        self.metrics.close()

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def _refuse(self, ws: ServerConnection, code: ErrorCode, message: str, **kwargs: Any) -> None:
        """`_refuse`, counted in the metrics (errors by code, bytes out)."""
        self.metrics.error(int(code))
        self.metrics.bytes_out.inc(len(wire.encode(wire.Error(int(code), message))))
        await _refuse(ws, code, message, **kwargs)

    async def _dispatch(self, session: EdgeSession, msg: wire.Message) -> list[wire.Message]:
        """Drafts go to the verification scheduler (batched across sessions); the rest to the worker."""
        if isinstance(msg, wire.Draft):
            replies = [await self.scheduler.submit(session, msg)]
        elif isinstance(msg, wire.Start) and session.greeted:
            replies = await self.scheduler.start(session, msg)  # prefilled in chunks between batches
        else:
            replies = await self._run(session.handle, msg)
        self.metrics.observe(msg, replies)
        return replies

    # -- admission ------------------------------------------------------------------

    async def _admit(self, ws: ServerConnection) -> EdgeSession | None:
        """The handshake of a new connection: an accepted session, or None (refused/closed)."""
        cfg = self.config
        self._unauthenticated[ws] = None
        if len(self._unauthenticated) > cfg.max_unauthenticated:
            oldest = next(iter(self._unauthenticated))
            del self._unauthenticated[oldest]
            asyncio.get_running_loop().create_task(self._refuse(
                oldest, ErrorCode.LIMIT, "too many connections without a handshake; closing the oldest"))
        try:
            raw = await asyncio.wait_for(ws.recv(), cfg.handshake_timeout_s)
        except asyncio.TimeoutError:
            await self._refuse(ws, ErrorCode.LIMIT, f"handshake timeout after {cfg.handshake_timeout_s:g} s")
            return None
        except ConnectionClosed:
            return None
        finally:
            self._unauthenticated.pop(ws, None)
        self.metrics.bytes_in.inc(len(raw))
        try:
            frame = wire.decode(raw, max_frame=MAX_HELLO_BYTES)
        except wire.WireError as exc:
            await self._refuse(ws, ErrorCode.BAD_FRAME, f"{type(exc).__name__}: {exc}")
            return None
        if not isinstance(frame.message, wire.Hello):
            await self._refuse(ws, ErrorCode.UNEXPECTED, "the first frame must be a Hello")
            return None
        if self._closing or self._draining:
            await self._refuse_new(ws)
            return None
        session = EdgeSession(self.model, cfg.limits, next(self._ids), auth_tokens=cfg.auth_tokens,
                              vocabulary=self.vocabulary)
        try:
            welcome = replace(session.hello(frame.message), replica=self.replica_id)  # no model work
        except ProtocolError as exc:
            log.warning("handshake from %s refused: %s", ws.remote_address, exc)
            await self._refuse(ws, exc.code, str(exc))
            return None
        if len(self._connections) >= cfg.max_sessions:
            await self._refuse(ws, ErrorCode.BUSY, f"edge busy: {len(self._connections)} sessions active "
                               f"(max {cfg.max_sessions})")
            return None
        self._connections.add(ws)
        _set_receive_limits(ws, cfg.limits.max_frame_bytes, _QUEUE_SESSION)
        data = wire.encode(welcome, session=session.session_id)
        self.metrics.bytes_out.inc(len(data))
        try:
            await ws.send(data)
        except ConnectionClosed:
            self._connections.discard(ws)
            return None
        log.info("session %d opened from %s (key %s)", session.session_id, ws.remote_address,
                 key_of(ws.request.path, ws.request.headers) if ws.request is not None else "")
        return session

    async def _refuse_new(self, ws: ServerConnection) -> None:
        """A new connection while draining or closing: SHUTDOWN, so the device goes elsewhere."""
        if self._draining and not self._closing:
            self.drain_report.hellos_refused += 1
            await self._refuse(ws, ErrorCode.SHUTDOWN, "draining: this replica takes no new sessions; "
                               "connect to another")
        else:
            await self._refuse(ws, ErrorCode.SHUTDOWN, "the edge is shutting down")

    async def _handle(self, ws: ServerConnection) -> None:
        if self._closing or self._draining:
            await self._refuse_new(ws)
            return
        session = await self._admit(ws)
        if session is None:
            return
        try:
            await self._serve_session(ws, session)
        finally:
            self._connections.discard(ws)
            if not self._worker._shutdown:  # noqa: SLF001 - closing during shutdown
                await self._run(session.close)
            log.info("session %d closed", session.session_id)

    # -- an authenticated session ---------------------------------------------------

    async def _read(self, ws: ServerConnection, inbox: asyncio.Queue, session: EdgeSession) -> None:
        """Receive frames eagerly, so that the count of unanswered frames is what the client sent.

        A flood is refused from here at once (the processor may be busy on the model).
        """
        cfg = self.config
        try:
            while True:
                try:
                    raw = await asyncio.wait_for(ws.recv(), cfg.idle_timeout_s)
                except asyncio.TimeoutError:
                    inbox.put_nowait(ProtocolError(ErrorCode.LIMIT, f"idle timeout after {cfg.idle_timeout_s:g} s"))
                    return
                self.metrics.bytes_in.inc(len(raw))
                if inbox.qsize() >= cfg.max_unanswered_frames:
                    log.warning("session %d refused: flooding", session.session_id)
                    await self._refuse(ws, ErrorCode.LIMIT, f"more than {cfg.max_unanswered_frames} frames sent "
                                       "without waiting for the replies (the protocol is request-reply)")
                    inbox.put_nowait(None)
                    return
                inbox.put_nowait(raw)
        except ConnectionClosed:
            inbox.put_nowait(None)

    async def _serve_session(self, ws: ServerConnection, session: EdgeSession) -> None:
        cfg = self.config
        budget = WorkBudget(cfg.work_tokens_per_s, cfg.work_burst_tokens, cfg.clock)
        inbox: asyncio.Queue = asyncio.Queue()
        self._inboxes[ws] = inbox
        if self._draining:  # the drain began while this session's Welcome was on its way
            inbox.put_nowait(_DRAIN)
        reader = asyncio.get_running_loop().create_task(self._read(ws, inbox, session))
        stream: asyncio.Task | None = None
        try:
            while True:
                item = await inbox.get()
                if item is None:
                    return
                if item is _DRAIN:
                    if stream is not None:
                        stream.cancel()
                        stream = None
                    self.drain_report.sessions_moved += 1
                    log.info("session %d: draining, sent elsewhere", session.session_id)
                    await self._refuse(ws, ErrorCode.SHUTDOWN, "draining: reconnect to another replica")
                    return
                if isinstance(item, ProtocolError):
                    log.warning("session %d refused: %s", session.session_id, item)
                    await self._refuse(ws, item.code, str(item))
                    return
                try:
                    frame = wire.decode(item, max_frame=cfg.limits.max_frame_bytes)
                except wire.WireError as exc:
                    await self._refuse(ws, ErrorCode.BAD_FRAME, f"{type(exc).__name__}: {exc}")
                    return
                if frame.session != session.session_id:
                    await self._refuse(ws, ErrorCode.UNEXPECTED, f"frame for session {frame.session} on "
                                       f"session {session.session_id}")
                    return
                if isinstance(frame.message, wire.End) and stream is not None:
                    stream.cancel()
                    stream = None
                delay = budget.charge(work_of(session, frame.message))
                if delay > 0:
                    await asyncio.sleep(delay)
                try:
                    replies = await self._dispatch(session, frame.message)
                except ProtocolError as exc:
                    log.warning("session %d refused: %s", session.session_id, exc)
                    await self._refuse(ws, exc.code, str(exc))
                    return
                for reply in replies:
                    data = wire.encode(reply, session=session.session_id, round=frame.round)
                    self.metrics.bytes_out.inc(len(data))
                    await ws.send(data)
                if self._draining and isinstance(frame.message, (wire.Draft, wire.More)):
                    self.drain_report.rounds_finished += 1  # received before the drain, answered
                if session.streaming and stream is None:
                    stream = asyncio.create_task(self._stream_edge_only(ws, session))
        except ConnectionClosed:
            pass
        except Exception:  # a bug must not take the server down with it
            log.exception("session %d failed", session.session_id)
            await self._refuse(ws, ErrorCode.INTERNAL, "internal error on the edge")
        finally:
            self._inboxes.pop(ws, None)
            reader.cancel()
            if stream is not None:
                stream.cancel()

    async def _stream_edge_only(self, ws: ServerConnection, session: EdgeSession) -> None:
        """Edge-only mode: decode and send one token at a time until done or cancelled."""
        try:
            while session.streaming:
                msg = await self.scheduler.step(session)  # batched with verification rounds
                data = wire.encode(msg, session=session.session_id)
                self.metrics.bytes_out.inc(len(data))
                await ws.send(data)
        except ConnectionClosed:
            pass
        except ProtocolError as exc:
            await self._refuse(ws, exc.code, str(exc))


async def _refuse(ws: ServerConnection, code: ErrorCode, message: str, timeout: float = 5.0) -> None:
    """Send an Error frame and close the connection cleanly (bounded in time)."""
    try:
        await asyncio.wait_for(ws.send(wire.encode(wire.Error(int(code), message))), timeout)
        close = 1011 if code == ErrorCode.INTERNAL else CLOSE_GOING_AWAY if code == ErrorCode.SHUTDOWN else 1008
        await asyncio.wait_for(ws.close(code=close, reason=code.name), timeout)
    except (ConnectionClosed, asyncio.TimeoutError, OSError):
        pass


class EdgeServerThread(ServerThread[EdgeServer]):
    """Runs an `EdgeServer` on its own event loop in a background thread.

    For embedding an edge in another process: tests, benchmarks and the demo. Use as a
    context manager; `url` is valid inside the block.
    """

    def __init__(self, model: TargetModel, config: ServerConfig | None = None) -> None:
        super().__init__(EdgeServer(model, config or ServerConfig(port=0)), name="edge-server")

    @property
    def url(self) -> str:
        return "" if self.port is None else f"{self.server.scheme}://{self.server.config.host}:{self.port}"

    def start_drain(self, grace_s: float = 30.0) -> "Future[DrainReport]":
        """Begin `EdgeServer.drain` on the server's loop without waiting (the test's drain hook)."""
        return self._loop.submit(self.server.drain(grace_s))

    def drain(self, grace_s: float = 30.0) -> DrainReport:
        """Drain and wait for it (not from the server's own loop)."""
        return self.start_drain(grace_s).result(grace_s + 30)
