"""Three edge processes behind a real HAProxy (deploy/haproxy.cfg as shipped), 8 devices.

Phase 1 kills (SIGKILL) the replica that serves the most devices while they generate;
phase 2 drains (SIGTERM) another one. Every request ends with the greedy reference and
no unverified token; only the sessions of the replica that went away reconnect; the
drained replica finishes, moves its sessions and takes no new one. The figures (sessions
per replica, reconnects per session, time from the kill to the first verified token on the
new replica) are printed as `CLUSTER FIGURES {...}` (run with -s) and written to
$DSSD_CLUSTER_FIGURES when set; nothing here asserts a time.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections import Counter
from typing import Any, Callable

import pytest

from device_runtime.drafter import LlamaDrafter
from device_runtime.session import DeviceClient, FailoverPolicy, GenerationConfig, GenerationResult
from dssd_common.cluster import LoopbackCluster, find_haproxy
from protocol.sampling import SamplingParams
from tests.test_end_to_end import reference_greedy

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(0.0)
N_DEVICES = 8
N_TOKENS = 40
#: The round after which a replica is killed or drained (tokens committed by its first device).
TRIGGER_AT = 4
#: Generous: HAProxy may need a health check or two to see a replica go; counted, not timed.
POLICY = FailoverPolicy(attempts=8, backoff_s=0.1, max_backoff_s=1.0)
FIGURES: dict[str, Any] = {}


@pytest.fixture(scope="module")
def cluster(tiny_pair, tmp_path_factory):  # noqa: ANN001, ANN201
    if find_haproxy() is None:
        pytest.skip("haproxy is not installed (Debian: apt-get install -y haproxy; .ci/run installs it)")
    with LoopbackCluster(str(tiny_pair.target_gguf), tmp_path_factory.mktemp("cluster"),
                         edge_args=("--threads", "1", "--drain-timeout", "120")) as c:
        yield c
    if FIGURES:
        print("CLUSTER FIGURES " + json.dumps(FIGURES, sort_keys=True))
        if os.environ.get("DSSD_CLUSTER_FIGURES"):
            with open(os.environ["DSSD_CLUSTER_FIGURES"], "w") as f:
                json.dump(FIGURES, f, indent=2, sort_keys=True)


@pytest.fixture(scope="module")
def drafters(tiny_pair):  # noqa: ANN001, ANN201
    ds = [LlamaDrafter(tiny_pair.draft_gguf, n_ctx=256, n_threads=1, f32_kv_cache=True) for _ in range(N_DEVICES)]
    yield ds
    for d in ds:
        d.close()


@pytest.fixture(scope="module")
def prompts(drafters, tiny_target):  # noqa: ANN001, ANN201
    """Eight prompts and their greedy references (transformers' generate on the same target)."""
    out = []
    for i in range(N_DEVICES):
        ids = drafters[0].tokenize(f"Device {i} asks why the sky is", add_bos=False)
        out.append((ids, reference_greedy(tiny_target, ids, N_TOKENS)))
    assert all(len(ref) > TRIGGER_AT + 2 for _, ref in out)  # each generation outlives the trigger
    return out


class _Run:
    """8 devices through the balancer: who served whom, and when each token came."""

    def __init__(self, cluster: LoopbackCluster, drafters: list[LlamaDrafter]) -> None:
        self.clients = [DeviceClient(d, cluster.url, failover=POLICY) for d in drafters]
        self.first: list[str] = []
        self.commits: list[list[tuple[float, int]]] = [[] for _ in drafters]  # (time, position)
        self.t_event: float | None = None

    async def connect(self) -> list[str]:
        for c in self.clients:
            self.first.append((await c.connect()).welcome.replica)
        return self.first

    async def generate(self, prompts: list[tuple[list[int], list[int]]], target: str,
                       event: Callable[[], None]) -> list[GenerationResult]:
        """All devices at once; `event` (kill or drain `target`) fires once, synchronously, when
        the first device served by `target` has committed TRIGGER_AT tokens: mid-generation."""

        def on_tokens(i: int) -> Callable[[list[int], str, bool], None]:
            def cb(ids: list[int], text: str, verified: bool) -> None:
                done = self.commits[i][-1][1] if self.commits[i] else 0
                self.commits[i].append((time.perf_counter(), done + len(ids)))
                if self.t_event is None and self.first[i] == target and done + len(ids) >= TRIGGER_AT:
                    self.t_event = time.perf_counter()
                    event()
            return cb

        config = GenerationConfig(sampling=GREEDY, gamma=2, max_new_tokens=N_TOKENS, pipeline=False)
        try:
            return await asyncio.gather(*(c.generate(ids, config, on_tokens(i))
                                          for i, (c, (ids, _)) in enumerate(zip(self.clients, prompts))))
        finally:
            for c in self.clients:
                await c.close()

    def first_token_after_move_ms(self, i: int, result: GenerationResult) -> float | None:
        """From the event to the first token committed on the new replica (position >= resume)."""
        if not result.stats.resumed_at or self.t_event is None:
            return None
        at = result.stats.resumed_at[0]
        prev = 0
        for t, end in self.commits[i]:
            if prev >= at:
                return round((t - self.t_event) * 1000, 1)
            prev = end
        return None


def _check_exact(results: list[GenerationResult], prompts: list[tuple[list[int], list[int]]]) -> None:
    for res, (_, ref) in zip(results, prompts):
        assert res.exact and all(res.verified) and res.stats.unverified_tokens == 0
        assert res.ids == ref


def test_killing_a_replica_moves_only_its_sessions_exactly(cluster, drafters, prompts):  # noqa: ANN001
    run = _Run(cluster, drafters)
    victim: list[str] = []

    async def go() -> list[GenerationResult]:  # connections and generations on one event loop
        first = await run.connect()
        assert len(set(first)) >= 2, first  # hash-balance-factor 150 spreads 8 sessions over >= 2 replicas
        victim.append(Counter(first).most_common(1)[0][0])
        return await run.generate(prompts, victim[0], lambda: cluster.kill(victim[0]))

    results = asyncio.run(go())
    victim = victim[0]
    _check_exact(results, prompts)
    moved = [i for i, r in enumerate(results) if r.stats.reconnects]
    assert moved, "no session was on the killed replica mid-generation"
    for i, r in enumerate(results):
        if run.first[i] == victim:  # finished there before the kill, or moved and finished elsewhere
            assert r.stats.replicas == [victim] if not r.stats.reconnects else r.stats.replicas[-1] != victim
        else:  # sessions on the other replicas never reconnect
            assert r.stats.reconnects == 0 and r.stats.replicas == [run.first[i]], (i, r.stats.replicas)
    FIGURES["kill"] = {
        "victim": victim,
        "sessions_per_replica": dict(Counter(run.first)),
        "reconnects_per_session": [r.stats.reconnects for r in results],
        "replicas_per_session": [r.stats.replicas for r in results],
        "kill_to_first_verified_token_on_new_replica_ms": {
            i: run.first_token_after_move_ms(i, results[i]) for i in moved},
    }


def test_a_drained_replica_finishes_moves_its_sessions_and_takes_no_new_one(cluster, drafters, prompts):  # noqa: ANN001
    """After the kill: the balancer has marked that replica down; 8 new devices (new keys) go to
    the two left, and the one serving the most of them drains while they generate."""
    dead = [r.replica_id for r in cluster.replicas if r.proc.poll() is not None]
    for name in dead:
        cluster.wait_state(name, "DOWN")
    run = _Run(cluster, drafters)
    probe: dict[str, Any] = {}

    async def go() -> list[GenerationResult]:
        await run.connect()
        target = Counter(run.first).most_common(1)[0][0]
        key = run.clients[run.first.index(target)].session_key
        c = DeviceClient(drafters[0], cluster.url, session_key=key, failover=POLICY)  # connects only

        async def probe_with_the_same_key() -> None:  # a new session that hashes to the draining replica
            try:
                probe["replica"] = (await c.connect(retry=True)).welcome.replica
                probe["connect_attempts"] = c.connect_attempts
            finally:
                await c.close()

        tasks: list[asyncio.Task] = []

        def drain() -> None:
            cluster.drain(target)
            tasks.append(asyncio.ensure_future(probe_with_the_same_key()))

        results = await run.generate(prompts, target, drain)
        await asyncio.gather(*tasks)
        probe["target"] = target
        return results

    results = asyncio.run(go())
    target = probe["target"]
    proc = cluster.replica(target).proc
    assert proc.wait(180) == 0  # drained, then exited on its own
    _check_exact(results, prompts)
    log = cluster.replica(target).log()
    report = json.loads(re.search(r"drained: (\{.*\})", log).group(1))
    assert not report["timed_out"] and report["sessions_moved"] >= 1, report
    after = log[log.index("draining:"):]
    assert "opened from" not in after, after  # no new session once the drain began
    assert probe["replica"] != target
    for i, r in enumerate(results):
        if run.first[i] == target:  # finished there before the drain, or moved
            assert r.stats.replicas == [target] if not r.stats.reconnects else r.stats.replicas[-1] != target
        else:
            assert r.stats.reconnects == 0 and r.stats.replicas == [run.first[i]], (i, r.stats.replicas)
    assert any(r.stats.reconnects for i, r in enumerate(results) if run.first[i] == target)
    FIGURES["drain"] = {
        "drained": target,
        "sessions_per_replica": dict(Counter(run.first)),
        "reconnects_per_session": [r.stats.reconnects for r in results],
        "drain_report": report,
        "probe_with_drained_replicas_key": probe,
        "drain_to_first_verified_token_on_new_replica_ms": {
            i: run.first_token_after_move_ms(i, r) for i, r in enumerate(results) if r.stats.reconnects},
    }
