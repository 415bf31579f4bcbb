"""Failover between edge replicas, in one process: real edges, real sockets, real llama.cpp.

The affinity key a balancer hashes on, several edge URLs (busy, lost and draining
replicas), the bounded reconnections, a drain that finishes the round in flight, and
the target's law after a forced move to another replica. The same with a real HAProxy
and edge processes is tests/test_cluster_haproxy.py.
"""
from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from device_runtime.__main__ import build_parser, edge_urls_of
from device_runtime.api import DeviceRuntime
from device_runtime.drafter import LlamaDrafter
from device_runtime.session import DeviceClient, EdgeLost, FailoverPolicy, GenerationConfig
from device_runtime.transport import EdgeUnreachable, parse_edge_urls
from edge_service.backends.torch_backend import TorchTargetModel
from edge_service.server import EdgeServerThread, ServerConfig
from edge_service.session import EdgeLimits
from protocol import wire
from protocol.affinity import KEY_HEADER, KEY_PARAM, check_key, key_of, with_key
from protocol.sampling import SamplingParams
from protocol.vocab import vocab_fingerprint
from tests.test_end_to_end import reference_greedy
from tests.test_law_real_stack import P_MIN, PARAMS, FrameDropProxy, conditional_pvalue, law_pvalue
from tests.test_reliability import _generate

GREEDY = SamplingParams(0.0)
PROMPT = "The cat sat on the"
#: No waiting between reconnections: the tests count attempts, they never time them.
QUICK = FailoverPolicy(attempts=3, backoff_s=0.0)


@pytest.fixture(scope="module")
def drafter(tiny_pair) -> LlamaDrafter:  # noqa: ANN001
    d = LlamaDrafter(tiny_pair.draft_gguf, n_ctx=512, n_threads=1, f32_kv_cache=True)
    yield d
    d.close()


@pytest.fixture(scope="module")
def other_target(tiny_pair) -> TorchTargetModel:  # noqa: ANN001
    """The same target loaded again: a second replica has its own model, like a second process."""
    return TorchTargetModel(tiny_pair.target_gguf, threads=1)


@pytest.fixture(scope="module")
def replica_b(other_target):  # noqa: ANN001, ANN201
    config = ServerConfig(port=0, limits=EdgeLimits(max_new_tokens=512), replica_id="replica-b")
    with EdgeServerThread(other_target, config) as edge:
        yield edge


def _health(edge: EdgeServerThread, path: str = "/health") -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{edge.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# -- the affinity key -------------------------------------------------------------------------


def test_affinity_key_rules() -> None:
    assert with_key("ws://lb:8765", "abc") == f"ws://lb:8765?{KEY_PARAM}=abc"
    assert with_key(f"ws://lb:8765/x?a=1&{KEY_PARAM}=old", "new") == f"ws://lb:8765/x?a=1&{KEY_PARAM}=new"
    for bad in ("", "a b", "k" * 65, "é", "a&b"):
        with pytest.raises(ValueError, match="session key"):
            check_key(bad)
    assert key_of(f"/?{KEY_PARAM}=k1") == "k1" and key_of("/", {KEY_HEADER: "k2"}) == "k2"
    assert key_of(f"/?{KEY_PARAM}=a%20b") == ""  # never trusted unchecked, even for a log line
    assert parse_edge_urls(["ws://a:1, ws://b:2", "ws://c:3"]) == ("ws://a:1", "ws://b:2", "ws://c:3")
    args = build_parser().parse_args(["--edge", "ws://a:1,ws://b:2", "--edge", "ws://c:3", "--session-key", "dev-7"])
    assert edge_urls_of(args) == ("ws://a:1", "ws://b:2", "ws://c:3") and args.session_key == "dev-7"
    assert edge_urls_of(build_parser().parse_args([])) == ("ws://127.0.0.1:8765",)


def test_the_key_travels_in_the_url_and_a_header_and_is_stable_across_reconnections(drafter):  # noqa: ANN001
    """A server that records each upgrade request and refuses it: the device's key is on both,
    the same on every connection of one client, different between clients."""
    seen: list[tuple[str, str]] = []
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)

    def record(connection, request):  # noqa: ANN001, ANN202
        seen.append((request.path, request.headers.get(KEY_HEADER, "")))
        return connection.respond(503, "draining\n")  # like a draining edge: worth another try

    async def start() -> Any:
        return await serve(lambda ws: None, "127.0.0.1", 0, process_request=record)

    thread.start()
    server = asyncio.run_coroutine_threadsafe(start(), loop).result()
    url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        one = DeviceClient(drafter, url, failover=QUICK)
        with pytest.raises(EdgeUnreachable) as err:
            _generate(one, [5, 6, 7], GenerationConfig(sampling=GREEDY))
        assert err.value.unavailable and not err.value.permanent
        assert one.connect_attempts == 1 + QUICK.attempts  # retried like BUSY, bounded
        two = DeviceClient(drafter, url, session_key="device-2", failover=FailoverPolicy(attempts=0))
        with pytest.raises(EdgeUnreachable):
            _generate(two, [5, 6, 7], GenerationConfig(sampling=GREEDY))
    finally:
        server.close()
        loop.call_soon_threadsafe(loop.stop)
    keys = [(key_of(path), header) for path, header in seen]
    assert keys == [(one.session_key, one.session_key)] * 4 + [("device-2", "device-2")]
    assert one.session_key != DeviceClient(drafter, url).session_key  # random per client by default


def test_one_key_per_runtime_for_all_its_slots(drafter, tiny_edge):  # noqa: ANN001
    with DeviceRuntime(drafters=[drafter], edge_url=[tiny_edge.url, "ws://127.0.0.1:1"], session_key="rt-1") as rt:
        assert rt.edge_url == f"{tiny_edge.url},ws://127.0.0.1:1"
        assert all(s.client.session_key == "rt-1" for s in rt._slots)  # noqa: SLF001
    with pytest.raises(ValueError, match="session key"):
        DeviceRuntime(drafters=[drafter], edge_url=tiny_edge.url, session_key="not a key")


# -- busy, lost and draining replicas ---------------------------------------------------------


def test_a_busy_replica_sends_the_device_to_the_next_url(tiny_target, replica_b, drafter):  # noqa: ANN001
    ids = drafter.tokenize(PROMPT, add_bos=False)
    with EdgeServerThread(tiny_target, ServerConfig(port=0, max_sessions=1, replica_id="replica-a")) as a:

        async def go() -> Any:
            async with connect(a.url) as holder:  # holds replica A's only session
                await holder.send(wire.encode(wire.Hello(wire.VERSION, vocab_fingerprint(tiny_target.vocab_tokens),
                                                         tiny_target.n_vocab)))
                assert isinstance(wire.decode(await holder.recv()).message, wire.Welcome)
                client = DeviceClient(drafter, [a.url, replica_b.url])
                try:
                    return await client.generate(ids, GenerationConfig(sampling=GREEDY, max_new_tokens=16))
                finally:
                    await client.close()

        res = asyncio.run(go())
    assert res.exact and res.ids == reference_greedy(tiny_target, ids, 16)
    assert res.stats.replicas == ["replica-b"] and res.stats.connect_attempts == 2 and res.stats.reconnects == 0


def test_a_lost_replica_moves_the_request_to_the_next_url_exactly(tiny_target, tiny_edge, replica_b, drafter):  # noqa: ANN001
    """Replica A's connection dies after the second Draft (its verdict lost) and A stays down."""
    ids = drafter.tokenize(PROMPT, add_bos=False)
    port = int(tiny_edge.url.rsplit(":", 1)[1])
    with FrameDropProxy(port, drop_after=4, stay_down=True) as proxy:
        client = DeviceClient(drafter, [f"ws://127.0.0.1:{proxy.port}", replica_b.url], failover=QUICK)
        res = _generate(client, ids, GenerationConfig(sampling=GREEDY, gamma=2, max_new_tokens=40))
    assert proxy.drops == 1
    assert res.exact and res.ids == reference_greedy(tiny_target, ids, 40)
    assert res.stats.reconnects == 1 and res.stats.replicas == [tiny_edge.server.replica_id, "replica-b"]
    assert 0 < res.stats.resumed_at[0] < 40  # moved mid-generation, after what replica A verified


def test_reconnections_are_bounded_then_the_loss_is_an_error(tiny_edge, drafter):  # noqa: ANN001
    port = int(tiny_edge.url.rsplit(":", 1)[1])
    emitted: list[bool] = []
    with FrameDropProxy(port, drop_after=4, stay_down=True) as proxy:
        client = DeviceClient(drafter, f"ws://127.0.0.1:{proxy.port}", failover=QUICK)
        with pytest.raises(EdgeLost, match=f"mid-generation .*{QUICK.attempts} reconnections failed"):
            _generate(client, drafter.tokenize(PROMPT, add_bos=False),
                      GenerationConfig(sampling=GREEDY, gamma=2, max_new_tokens=40),
                      lambda ids, text, verified: emitted.extend([verified] * len(ids)))
    assert client.connect_attempts == 1 + QUICK.attempts
    assert emitted and all(emitted)  # verified tokens only, never draft text


def test_a_drain_finishes_the_round_in_flight_then_moves_the_session(tiny_target, replica_b, drafter):  # noqa: ANN001
    """Replica A's model is held busy while the device's Start and first Draft wait in A's queue;
    A drains; then the model is released. A answers that round (the device commits it), sends
    the device elsewhere, and the request ends exactly on B. A takes no new session."""
    ids = drafter.tokenize(PROMPT, add_bos=False)
    with EdgeServerThread(tiny_target, ServerConfig(port=0, replica_id="replica-a")) as a:
        release = threading.Event()
        a.server._worker.submit(release.wait)  # noqa: SLF001 - the model worker, held
        report: list[Any] = []

        def drain_when_the_round_is_queued() -> None:
            server = a.server
            while not (server._worker._work_queue.qsize() >= 1  # noqa: SLF001 - Start waits for the model
                       and any(q.qsize() >= 1 for q in list(server._inboxes.values()))):  # noqa: SLF001 - Draft 1
                if release.wait(0.01):
                    return
            future = a.start_drain()
            while not server.draining:
                pass
            release.set()
            report.append(future.result(120))

        helper = threading.Thread(target=drain_when_the_round_is_queued, daemon=True)
        helper.start()
        try:
            client = DeviceClient(drafter, [a.url, replica_b.url], failover=QUICK)
            res = _generate(client, ids, GenerationConfig(sampling=GREEDY, gamma=3, max_new_tokens=24,
                                                          pipeline=False))
        finally:
            release.set()
            helper.join(120)
        assert report, "the drain did not run"
        status, health = _health(a)
        assert status == 503 and health["status"] == "draining" and health["replica"] == "replica-a"
        assert _health(a, "/health/live")[0] == 200  # alive while draining: no liveness kill
        newcomer = DeviceClient(drafter, [a.url, replica_b.url], failover=QUICK)
        again = _generate(newcomer, ids, GenerationConfig(sampling=GREEDY, max_new_tokens=8))
    assert res.exact and res.ids == reference_greedy(tiny_target, ids, 24)
    assert res.stats.replicas == ["replica-a", "replica-b"] and res.stats.reconnects == 1
    assert res.stats.resumed_at[0] >= 1  # the round in flight was answered and committed
    assert report[0].rounds_finished == 1 and report[0].sessions_moved == 1 and not report[0].timed_out
    assert again.stats.replicas == ["replica-b"] and again.stats.connect_attempts == 2  # A refused it
    assert again.ids == reference_greedy(tiny_target, ids, 8)


# -- the target's law after a forced move --------------------------------------------------------


@pytest.mark.slow
def test_law_after_a_forced_move_to_another_replica(tiny_target, tiny_edge, replica_b, drafter):  # noqa: ANN001
    """Every generation starts on replica A, loses its second round's verdict there (frames: Hello,
    Start, Draft 1, Draft 2; the drop cannot depend on the content) and finishes on replica B,
    a separate edge with its own model: the joint law of the first 6 tokens, and the
    tokens made after the move given their prefix and the outcome of the round before it, are the
    target's. (1,000 generations keep it cheap; a new replica replaying the request's edge
    stream is too weak an effect on the tiny pair to fail it at this size (checked here: that
    mutant passed); test_law_real_stack's resume test, 3,000 generations on the same
    `resume_seed` path, is the one written against it.)"""
    n = 1000
    port = int(tiny_edge.url.rsplit(":", 1)[1])
    with FrameDropProxy(port, drop_after=4, spare_resume=False) as proxy:
        urls = [f"ws://127.0.0.1:{proxy.port}", replica_b.url]
        p, results = law_pvalue(tiny_target, drafter, urls[0], 6, lambda seed: GenerationConfig(
            mode="dssd", max_new_tokens=8, sampling=PARAMS, gamma=3, seed=seed, pipeline=False), n=n,
            client=lambda: DeviceClient(drafter, urls, failover=QUICK), fresh_client=True)
    moved = [r for r in results if r.stats.replicas == [tiny_edge.server.replica_id, "replica-b"]]
    assert len(moved) == proxy.drops > 0.95 * n, (len(moved), proxy.drops)
    assert all(r.stats.reconnects == 1 for r in moved)
    assert p > P_MIN, p
    # every token made on replica B, given its prefix and the outcome of round 1 on A (both
    # fixed before its draws): a new replica replaying the request's edge stream would
    # decide them with the very uniforms that decided round 1
    resumed = [(tuple(r.ids[:t]), r.ids[t], r.stats.round_tokens[0]) for r in moved
               for t in range(r.stats.resumed_at[0], len(r.ids))]
    p_resumed = conditional_pvalue(tiny_target, drafter.tokenize(PROMPT, add_bos=False), resumed)
    assert p_resumed > P_MIN, p_resumed
