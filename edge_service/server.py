"""WebSocket server: one `EdgeSession` per device connection.

The event loop only moves frames; all model work runs on one worker thread, so a slow
forward never stalls other connections' I/O and sessions never race on the model. A bad
frame or refused request gets an Error frame and a clean close of that connection only.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from edge_service.backends.base import TargetModel
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


class EdgeServer:
    """Accepts device connections and runs their sessions against one target model."""

    def __init__(self, model: TargetModel, config: ServerConfig) -> None:
        self.model = model
        self.config = config
        self._ids = itertools.count(1)
        self._active = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-model")
        self._server: Server | None = None

    @property
    def active_sessions(self) -> int:
        return self._active

    async def start(self) -> int:
        """Start listening; returns the bound port (useful with port 0)."""
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            compression=None,
            max_size=self.config.limits.max_frame_bytes,
        )
        port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self.config.port
        log.info("edge serving %s on ws://%s:%d", self.model.name, self.config.host, port)
        return port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._worker.shutdown(wait=True)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def _handle(self, ws: ServerConnection) -> None:
        if self._active >= self.config.max_sessions:
            await _refuse(ws, ErrorCode.BUSY, f"edge busy: {self._active} sessions active")
            return
        self._active += 1
        session = EdgeSession(self.model, self.config.limits, next(self._ids))
        stream: asyncio.Task | None = None
        peer = ws.remote_address
        log.info("session %d opened from %s", session.session_id, peer)
        try:
            async for raw in ws:
                try:
                    frame = wire.decode(raw, max_frame=self.config.limits.max_frame_bytes)
                except wire.WireError as exc:
                    await _refuse(ws, ErrorCode.BAD_FRAME, f"{type(exc).__name__}: {exc}")
                    return
                if isinstance(frame.message, wire.End) and stream is not None:
                    stream.cancel()
                    stream = None
                try:
                    replies = await self._run(session.handle, frame.message)
                except ProtocolError as exc:
                    log.warning("session %d refused: %s", session.session_id, exc)
                    await _refuse(ws, exc.code, str(exc))
                    return
                for reply in replies:
                    await ws.send(wire.encode(reply, session=session.session_id, round=frame.round))
                if session.streaming and stream is None:
                    stream = asyncio.create_task(self._stream_edge_only(ws, session))
        except ConnectionClosed:
            pass
        except Exception:  # a bug must not take the server down with it
            log.exception("session %d failed", session.session_id)
            await _refuse(ws, ErrorCode.INTERNAL, "internal error on the edge")
        finally:
            if stream is not None:
                stream.cancel()
            await self._run(session.close)
            self._active -= 1
            log.info("session %d closed", session.session_id)

    async def _stream_edge_only(self, ws: ServerConnection, session: EdgeSession) -> None:
        """Edge-only mode: decode and send one token at a time until done or cancelled."""
        try:
            while session.streaming:
                msg = await self._run(session.edge_only_step)
                await ws.send(wire.encode(msg, session=session.session_id))
        except ConnectionClosed:
            pass
        except ProtocolError as exc:
            await _refuse(ws, exc.code, str(exc))


async def _refuse(ws: ServerConnection, code: ErrorCode, message: str) -> None:
    try:
        await ws.send(wire.encode(wire.Error(int(code), message)))
        await ws.close(code=1008 if code != ErrorCode.INTERNAL else 1011, reason=code.name)
    except ConnectionClosed:
        pass


class EdgeServerThread:
    """Runs an `EdgeServer` on its own event loop in a background thread.

    For embedding an edge in another process: tests, benchmarks and the demo. Use as a
    context manager; `url` is valid inside the block.
    """

    def __init__(self, model: TargetModel, config: ServerConfig | None = None) -> None:
        import threading

        self.server = EdgeServer(model, config or ServerConfig(port=0))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="edge-server", daemon=True)
        self.url = ""

    def __enter__(self) -> "EdgeServerThread":
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=60)
        self.url = f"ws://{self.server.config.host}:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=60)
        self._loop.close()
