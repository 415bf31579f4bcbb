"""The device's WebSocket link to the edge: handshake, framed send/recv, byte accounting.

Nothing the edge sends is trusted: every frame is decoded by `protocol.wire` with a
receive limit sized to this vocabulary, and the Welcome is checked against sane bounds
(`protocol.checks.check_welcome`). A connection that cannot be opened raises
`EdgeUnreachable` with a one-line cause a user can act on (refused, DNS, TLS, wrong
scheme, not an edge).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from typing import Sequence, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from protocol import wire
from protocol.affinity import KEY_HEADER, with_key
from protocol.checks import check_welcome

log = logging.getLogger(__name__)

M = TypeVar("M")
#: HTTP answers to the upgrade from a draining edge (503) or a load balancer while no replica
#: can take the connection (bad gateway, unavailable, gateway timeout): worth another try.
_BALANCER_UNAVAILABLE = (502, 503, 504)
#: Receive limit beyond the largest legitimate downlink (a full fp32 P_j row).
_FRAME_SLACK = 64 * 1024


def max_downlink_frame(n_vocab: int) -> int:
    """The largest frame an honest edge sends to a device of this vocabulary: a full float32
    P_j row (4 bytes per id) plus headers and slack (candidates are 8 bytes each, at most
    `MAX_CANDIDATES`, and a Done's stats are a small JSON object)."""
    return wire.HEADER_SIZE + 4 * n_vocab + _FRAME_SLACK


def parse_edge_urls(edges: str | Sequence[str] | None) -> tuple[str, ...]:
    """Edge URLs from `--edge` values: each may list several, comma-separated; order kept.

    The first is where a device starts; the others are where it moves, in turn, when its
    edge is lost, busy or draining (behind a load balancer, one URL is enough).
    """
    if edges is None:
        return ()
    items = [edges] if isinstance(edges, str) else list(edges)
    return tuple(u.strip() for item in items for u in item.split(",") if u.strip())


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


class EdgeUnreachable(ConnectionError):
    """No DSSD session could be opened with the edge; the message names the cause.

    `permanent`: retrying cannot help (TLS verification, wrong scheme, not an edge, bad
    URL); otherwise the edge may come back (refused, DNS, timeout). `unavailable`: the
    server answered HTTP 502/503/504 (a draining edge, or a balancer with no replica free
    right now): like BUSY, worth waiting for.
    """

    def __init__(self, url: str, cause: str, *, permanent: bool, unavailable: bool = False) -> None:
        super().__init__(f"cannot reach the edge at {url}: {cause}")
        self.url = url
        self.cause = cause
        self.permanent = permanent
        self.unavailable = unavailable


def describe_connect_error(url: str, exc: BaseException) -> EdgeUnreachable:
    """Turn what `websockets.connect` raised into an `EdgeUnreachable` naming the cause."""
    tls = url.startswith("wss://")
    if isinstance(exc, EdgeUnreachable):
        return exc
    if isinstance(exc, InvalidURI):
        return EdgeUnreachable(url, f"invalid URL ({exc}); expected ws://HOST:PORT or wss://HOST:PORT",
                               permanent=True)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return EdgeUnreachable(url, f"TLS certificate verification failed ({exc.verify_message}); "
                               "pass the edge's CA certificate (--ca-file)", permanent=True)
    if isinstance(exc, ssl.SSLError):
        hint = "; the edge may not speak TLS (use ws:// instead of wss://?)" if "WRONG_VERSION" in str(exc) \
            or "record layer" in str(exc) else ""
        return EdgeUnreachable(url, f"TLS handshake failed ({exc.reason or exc}){hint}", permanent=True)
    if tls and isinstance(exc, (ConnectionResetError, EOFError)):
        return EdgeUnreachable(url, "the server closed the connection during the TLS handshake; it may not "
                               "speak TLS (use ws:// instead of wss://?)", permanent=False)
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        if status in _BALANCER_UNAVAILABLE:  # a draining edge, or a balancer with no replica free
            return EdgeUnreachable(url, f"the server answered HTTP {status} (a draining edge, or a load "
                                   "balancer with no edge available right now)", permanent=False, unavailable=True)
        return EdgeUnreachable(url, f"not a DSSD edge: the server answered HTTP {status}", permanent=True)
    if (isinstance(exc, ConnectionError) and not isinstance(exc, ConnectionRefusedError)
            and "Connect call failed" in str(exc)):  # asyncio's message for the TCP connect itself
        # no server spoke yet: a listener closing under us (an edge shutting down) resets
        # the connect instead of refusing it, depending on timing. Transient, like refused.
        return EdgeUnreachable(url, f"the TCP connection failed ({exc.strerror or exc}); is the edge running?",
                               permanent=False)
    if isinstance(exc, (InvalidHandshake, EOFError)) or (isinstance(exc, ConnectionError) and not
                                                          isinstance(exc, ConnectionRefusedError)):
        hint = "" if tls else " (if the edge serves TLS, use wss://)"
        return EdgeUnreachable(url, f"the server did not complete a WebSocket handshake{hint}: {exc}",
                               permanent=not tls)
    if isinstance(exc, socket.gaierror):
        return EdgeUnreachable(url, f"cannot resolve the host name ({exc.strerror})", permanent=False)
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return EdgeUnreachable(url, "connection refused (is the edge running, and is the port right?)",
                               permanent=False)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return EdgeUnreachable(url, "timed out opening the connection", permanent=False)
    if isinstance(exc, OSError):
        return EdgeUnreachable(url, exc.strerror or str(exc) or type(exc).__name__, permanent=False)
    return EdgeUnreachable(url, f"{type(exc).__name__}: {exc}", permanent=False)


class EdgeLink:
    """One connection to the edge. Counts every frame's bytes in each direction."""

    def __init__(self, ws: ClientConnection, welcome: wire.Welcome, max_frame: int = wire.DEFAULT_MAX_FRAME,
                 url: str = "") -> None:
        self._ws = ws
        self.url = url  # as given (without the affinity key)
        self.welcome = welcome
        self.max_frame = max_frame
        self.bytes_up = 0
        self.bytes_down = 0

    @classmethod
    async def connect(
        cls, url: str, hello: wire.Hello, *, timeout: float = 30.0, ssl_context: ssl.SSLContext | None = None,
        key: str = "",
    ) -> "EdgeLink":
        """Open a session: WebSocket handshake, Hello, a checked Welcome.

        `key`: the session-affinity key (protocol/affinity.py), sent as the URL's
        `dssd_key` parameter and the `X-DSSD-Key` header for a load balancer to hash on.

        Raises `EdgeUnreachable` when no connection could be opened, `EdgeError` when the
        edge refused the Hello (AUTH, VOCAB_MISMATCH, VERSION, BUSY, ...), and
        `wire.WireError` when the edge answered with an invalid frame.
        """
        max_frame = max_downlink_frame(hello.n_vocab)
        kwargs: dict = {"ssl": ssl_context} if url.startswith("wss://") and ssl_context is not None else {}
        if key:
            kwargs["additional_headers"] = {KEY_HEADER: key}
        try:
            ws = await connect(with_key(url, key) if key else url, compression=None, max_size=max_frame,
                               open_timeout=timeout, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure to connect gets a named cause
            raise describe_connect_error(url, exc) from exc
        link = cls(ws, welcome=None, max_frame=max_frame, url=url)  # type: ignore[arg-type]
        try:
            await link.send(hello)
            try:
                welcome = await link.recv(wire.Welcome, timeout=timeout)
            except ConnectionError as exc:
                raise EdgeUnreachable(url, f"the server closed the connection during the DSSD handshake ({exc})",
                                      permanent=False) from None
            check_welcome(welcome, hello)
            link.welcome = welcome
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
            if exc.rcvd is not None and exc.rcvd.code == 1009:
                raise wire.Oversized(f"the edge refused a frame of this device as too large ({exc})") from None
            if exc.sent is not None and exc.sent.code == 1009:
                raise wire.Oversized(f"the edge sent a frame over this device's limit of {self.max_frame} "
                                     "bytes") from None
            raise ConnectionError(f"edge closed the connection: {exc}") from None
        if isinstance(data, str):
            raise wire.Malformed("edge sent a text frame")
        self.bytes_down += len(data)
        frame = wire.decode(data, max_frame=self.max_frame)
        msg = frame.message
        if isinstance(msg, wire.Error):
            raise EdgeError(msg.code, msg.message)
        if not isinstance(msg, expected):
            raise wire.Malformed(f"expected {expected}, edge sent {type(msg).__name__}")
        if self.welcome is not None and frame.session != self.welcome.session_id:
            raise wire.Malformed(f"edge sent a frame for session {frame.session} on session "
                                 f"{self.welcome.session_id}")
        return msg

    async def close(self) -> None:
        await self._ws.close()
