"""WebSocket server: one `EdgeSession` per device connection.

The event loop only moves frames; all model work runs on one worker thread, so a slow
forward never stalls other connections' I/O and sessions never race on the model. A bad
frame or refused request gets an Error frame and a clean close of that connection only.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from dataclasses import dataclass, field
from typing import Any, Callable

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.exceptions import ConnectionClosed

from dssd_common.loop_thread import ServerThread
from edge_service.backends.base import TargetModel
from edge_service.metrics import EdgeMetrics
from edge_service.scheduler import BatchConfig, VerifyScheduler
from edge_service.session import EdgeLimits, EdgeSession, ProtocolError
from protocol import wire
from protocol.wire import ErrorCode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    max_sessions: int = 64
    limits: EdgeLimits = field(default_factory=EdgeLimits)
    #: Shared access tokens; a device must present one in its Hello. Empty: no check.
    auth_tokens: frozenset[str] = frozenset()
    #: TLS (wss://): PEM certificate chain and private key.
    tls_cert: str | None = None
    tls_key: str | None = None
    handshake_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0
    #: Per-connection frame rate: sustained frames/s and burst.
    rate_per_s: float = 500.0
    rate_burst: int = 1000
    #: Cross-session verification batching (edge_service/scheduler.py).
    batching: BatchConfig = field(default_factory=BatchConfig)
    #: Prometheus /metrics on this HTTP port (bound to `host`; 0: any free port). None: off.
    metrics_port: int | None = None


class TokenBucket:
    """Frame-rate limit of one connection: `rate` per second sustained, `burst` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self._tokens = float(burst)
        self._t = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
        self._t = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class EdgeServer:
    """Accepts device connections and runs their sessions against one target model."""

    def __init__(self, model: TargetModel, config: ServerConfig) -> None:
        self.model = model
        self.config = config
        self._ids = itertools.count(1)
        self._connections: set[ServerConnection] = set()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-model")
        self._server: Server | None = None
        self._closing = False
        self.scheme = "wss" if config.tls_cert else "ws"
        self.metrics = EdgeMetrics(active_sessions=lambda: len(self._connections))
        self.metrics_port: int | None = None  # bound /metrics port once started
        self.scheduler = VerifyScheduler(
            model, config.batching, self._run, metrics=self.metrics, active=lambda: len(self._connections)
        )

    @property
    def active_sessions(self) -> int:
        return len(self._connections)

    def health(self) -> dict[str, Any]:
        return {
            "status": "closing" if self._closing else "ok",
            "model": self.model.name,
            "sessions": self.active_sessions,
            "max_sessions": self.config.max_sessions,
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
            max_size=self.config.limits.max_frame_bytes,
            ssl=self._ssl_context(),
            process_request=self._http,
        )
        port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self.config.port
        log.info("edge serving %s on %s://%s:%d", self.model.name, self.scheme, self.config.host, port)
        if self.config.metrics_port is not None and self.metrics_port is None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.host)
        return port

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        """Plain HTTP GET /health on the WebSocket port, for orchestration."""
        if request.path == "/health":
            return connection.respond(HTTPStatus.OK, json.dumps(self.health()) + "\n")
        return None

    async def close(self, grace_s: float = 10.0) -> None:
        """Graceful shutdown: refuse new work, tell every device, close, never hang."""
        self._closing = True
        for ws in list(self._connections):
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
        else:
            replies = await self._run(session.handle, msg)
        self.metrics.observe(msg, replies)
        return replies

    async def _handle(self, ws: ServerConnection) -> None:
        if self._closing:
            await self._refuse(ws, ErrorCode.SHUTDOWN, "the edge is shutting down")
            return
        if len(self._connections) >= self.config.max_sessions:
            await self._refuse(ws, ErrorCode.BUSY, f"edge busy: {len(self._connections)} sessions active")
            return
        self._connections.add(ws)
        cfg = self.config
        session = EdgeSession(self.model, cfg.limits, next(self._ids), auth_tokens=cfg.auth_tokens)
        bucket = TokenBucket(cfg.rate_per_s, cfg.rate_burst)
        stream: asyncio.Task | None = None
        log.info("session %d opened from %s", session.session_id, ws.remote_address)
        try:
            while True:
                timeout = cfg.idle_timeout_s if session.greeted else cfg.handshake_timeout_s
                try:
                    raw = await asyncio.wait_for(ws.recv(), timeout)
                    self.metrics.bytes_in.inc(len(raw))
                except asyncio.TimeoutError:
                    what = "idle" if session.greeted else "handshake"
                    await self._refuse(ws, ErrorCode.LIMIT, f"{what} timeout after {timeout:.0f} s")
                    return
                if not bucket.take():
                    await self._refuse(ws, ErrorCode.LIMIT, f"rate limit of {cfg.rate_per_s:.0f} frames/s exceeded")
                    return
                try:
                    frame = wire.decode(raw, max_frame=cfg.limits.max_frame_bytes)
                except wire.WireError as exc:
                    await self._refuse(ws, ErrorCode.BAD_FRAME, f"{type(exc).__name__}: {exc}")
                    return
                if session.greeted and frame.session != session.session_id:
                    await self._refuse(ws, ErrorCode.UNEXPECTED, f"frame for session {frame.session} on "
                                       f"session {session.session_id}")
                    return
                if isinstance(frame.message, wire.End) and stream is not None:
                    stream.cancel()
                    stream = None
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
                if session.streaming and stream is None:
                    stream = asyncio.create_task(self._stream_edge_only(ws, session))
        except ConnectionClosed:
            pass
        except Exception:  # a bug must not take the server down with it
            log.exception("session %d failed", session.session_id)
            await self._refuse(ws, ErrorCode.INTERNAL, "internal error on the edge")
        finally:
            if stream is not None:
                stream.cancel()
            self._connections.discard(ws)
            if not self._worker._shutdown:  # noqa: SLF001 - closing during shutdown
                await self._run(session.close)
            log.info("session %d closed", session.session_id)

    async def _stream_edge_only(self, ws: ServerConnection, session: EdgeSession) -> None:
        """Edge-only mode: decode and send one token at a time until done or cancelled."""
        try:
            while session.streaming:
                msg = await self._run(session.edge_only_step)
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
        await asyncio.wait_for(ws.close(code=1011 if code == ErrorCode.INTERNAL else 1008,
                                        reason=code.name), timeout)
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
