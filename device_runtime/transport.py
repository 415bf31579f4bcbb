"""The device's WebSocket link to the edge: handshake, framed send/recv, byte accounting."""
from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from protocol import wire

log = logging.getLogger(__name__)

M = TypeVar("M")
#: Largest frame the device accepts (a full fp32 P_j of a 262k vocabulary is ~1 MB).
MAX_FRAME = 16 * 1024 * 1024


class EdgeError(RuntimeError):
    """The edge refused or failed; `code` is a `protocol.wire.ErrorCode`."""

    def __init__(self, code: int, message: str) -> None:
        try:
            name = wire.ErrorCode(code).name
        except ValueError:
            name = str(code)
        super().__init__(f"edge error {name}: {message}")
        self.code = code
        self.reason = message


class EdgeLink:
    """One connection to the edge. Counts every frame's bytes in each direction."""

    def __init__(self, ws: ClientConnection, welcome: wire.Welcome) -> None:
        self._ws = ws
        self.welcome = welcome
        self.bytes_up = 0
        self.bytes_down = 0

    @classmethod
    async def connect(
        cls, url: str, hello: wire.Hello, *, timeout: float = 30.0, ssl_context: ssl.SSLContext | None = None
    ) -> "EdgeLink":
        kwargs = {"ssl": ssl_context} if url.startswith("wss://") and ssl_context is not None else {}
        ws = await connect(url, compression=None, max_size=MAX_FRAME, open_timeout=timeout, **kwargs)
        link = cls(ws, welcome=None)  # type: ignore[arg-type]
        try:
            await link.send(hello)
            link.welcome = await link.recv(wire.Welcome, timeout=timeout)
        except BaseException:
            await ws.close()
            raise
        return link

    async def send(self, msg: wire.Message, *, round: int = 0) -> None:
        data = wire.encode(msg, session=self.welcome.session_id if self.welcome else 0, round=round)
        self.bytes_up += len(data)
        await self._ws.send(data)

    async def recv(self, expected: type[M] | tuple[type, ...], timeout: float | None = None) -> M:
        """The next frame, which must be of type `expected` (an Error frame raises EdgeError).

        Raises asyncio.TimeoutError after `timeout` seconds without a frame.
        """
        try:
            data = await asyncio.wait_for(self._ws.recv(), timeout)
        except ConnectionClosed as exc:
            raise ConnectionError(f"edge closed the connection: {exc}") from None
        if isinstance(data, str):
            raise wire.Malformed("edge sent a text frame")
        self.bytes_down += len(data)
        msg = wire.decode(data, max_frame=MAX_FRAME).message
        if isinstance(msg, wire.Error):
            raise EdgeError(msg.code, msg.message)
        if not isinstance(msg, expected):
            raise wire.Malformed(f"expected {expected}, edge sent {type(msg).__name__}")
        return msg

    async def close(self) -> None:
        await self._ws.close()
