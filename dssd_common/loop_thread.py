"""An asyncio event loop on a background thread, and a server run on one.

Why: the edge server and the device's OpenAI server are asyncio servers that tests,
benchmarks, the demo and the blocking device API embed in ordinary threaded code.
Each had its own copy of "new loop, daemon thread, run_coroutine_threadsafe, stop,
join, close"; the copies differed only in the thread's name and the URL they printed.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Coroutine, Generic, Protocol, TypeVar

T = TypeVar("T")


class LoopThread:
    """An event loop running forever on a daemon thread, fed coroutines from other threads."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def in_loop_thread(self) -> bool:
        """True when called from the loop's own thread (where a blocking `run` would deadlock)."""
        return threading.current_thread() is self.thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule `coro` on the loop; the caller may wait on, or cancel, the future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and wait for its result (not from the loop's own thread)."""
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError(f"{self.thread.name}: a blocking call from the loop's own thread would deadlock")
        return self.submit(coro).result(timeout)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop and join the thread; the loop is closed once the thread has ended."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=timeout)
        if not self.thread.is_alive():
            self.loop.close()


class AsyncServer(Protocol):
    """What `ServerThread` runs: a server that starts (returning its port) and closes."""

    async def start(self) -> int: ...

    async def close(self) -> None: ...


S = TypeVar("S", bound=AsyncServer)
ST = TypeVar("ST", bound="ServerThread[Any]")


class ServerThread(Generic[S]):
    """Runs `server` on its own event loop in a background thread; a context manager.

    `__enter__` starts the server and sets `port`; `__exit__` closes it and stops the
    loop. Subclasses name the thread and turn `port` into their URL.
    """

    def __init__(self, server: S, *, name: str, timeout_s: float = 60.0) -> None:
        self.server = server
        self.port: int | None = None
        self._timeout_s = timeout_s
        self._loop = LoopThread(name)

    @property
    def running(self) -> bool:
        """True between a successful `__enter__` and `__exit__`."""
        return self._loop.running

    def __enter__(self: ST) -> ST:
        self._loop.start()
        self.port = self._loop.run(self.server.start(), self._timeout_s)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.run(self.server.close(), self._timeout_s)
        self._loop.stop(self._timeout_s)
