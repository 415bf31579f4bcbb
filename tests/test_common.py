"""dssd_common's shared helpers: the cache re-sync prefix and the background event loop."""
from __future__ import annotations

import asyncio
import threading

import pytest

from dssd_common.loop_thread import LoopThread, ServerThread
from dssd_common.prefix import common_prefix_len


@pytest.mark.parametrize(("cached", "wanted", "n"), [
    ([], [1, 2], 0),
    ([1, 2, 3], [], 0),
    ([1, 2, 3], [1, 2, 3], 3),
    ([1, 2, 3], [1, 2], 2),
    ([1, 2], [1, 2, 3], 2),
    ([1, 2, 3], [1, 9, 3], 1),
    ([4, 2, 3], [1, 2, 3], 0),
])
def test_common_prefix_len(cached: list[int], wanted: list[int], n: int) -> None:
    assert common_prefix_len(cached, wanted) == n


def test_loop_thread_runs_coroutines_and_refuses_blocking_calls_from_itself() -> None:
    lt = LoopThread("test-loop")
    lt.start()
    try:
        async def add(a: int, b: int) -> int:
            await asyncio.sleep(0)
            return a + b

        assert lt.run(add(2, 3), timeout=30) == 5

        async def nested() -> None:
            lt.run(add(1, 1))

        with pytest.raises(RuntimeError, match="deadlock"):
            lt.run(nested(), timeout=30)
    finally:
        lt.stop(timeout=30)
    assert not lt.running and lt.loop.is_closed()


class _FakeServer:
    """Starts on the loop it is given (records which thread), returns a port."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    async def start(self) -> int:
        self.events.append(("start", threading.current_thread().name))
        return 4321

    async def close(self) -> None:
        self.events.append(("close", threading.current_thread().name))


def test_server_thread_starts_and_closes_the_server_on_its_thread() -> None:
    server = _FakeServer()
    st = ServerThread(server, name="fake-server")
    assert st.port is None and not st.running
    with st as entered:
        assert entered is st and st.port == 4321 and st.running
    assert not st.running
    assert server.events == [("start", "fake-server"), ("close", "fake-server")]
