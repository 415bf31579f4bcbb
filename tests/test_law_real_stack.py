"""The target's law on the paths users run: real llama.cpp device, real edge, real sockets.

Each test runs thousands of short sampled generations through the whole stack and
compares the joint law of their first tokens with the target's exact law (computed from
its logits). Each exercises one mechanism the easy tests never reach (they play gamma
<= 1): rounds of gamma >= 3, pipelined drafts kept after a right bonus guess, drafts made
ahead and extended in line, candidate residual sampling with `More`, and a request
resumed after its connection was dropped mid-round. Top-k 2 keeps the law small (2^depth
cells) so a few thousand samples have the power to see a broken rule; the closing note
of the "Exact by default" issue lists the mutation each test catches.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable

import numpy as np
import pytest
from scipy import stats

from device_runtime.drafter import LlamaDrafter
from device_runtime.session import DeviceClient, GenerationConfig, GenerationResult
from protocol.sampling import SamplingParams, probabilities
from tests.test_adaptive import _exact_prefix_law, _Scripted

PARAMS = SamplingParams(1.0, top_k=2)
PROMPT = "The cat sat on the"
N = 2500
P_MIN = 1e-3


@pytest.fixture(scope="module")
def drafter(tiny_pair) -> LlamaDrafter:  # noqa: ANN001
    d = LlamaDrafter(tiny_pair.draft_gguf, n_ctx=512, n_threads=1, f32_kv_cache=True)
    yield d
    d.close()


def law_pvalue(target: Any, drafter: LlamaDrafter, url: str, depth: int, make_config: Callable[[int], GenerationConfig],
               *, n: int = N, client: Callable[[], DeviceClient] | None = None,
               fresh_connection: bool = False, fresh_client: bool = False) -> tuple[float, list[GenerationResult]]:
    """Chi-square p-value of the first `depth` tokens of n generations against the exact law.

    `fresh_client`: a new client (from `client`) for every generation, e.g. one that must
    start on its first edge URL each time.

    Cells with few expected counts are pooled, so the test stays valid; a sequence outside
    the target's support fails at once.
    """
    ids = drafter.tokenize(PROMPT, add_bos=False)
    law = _exact_prefix_law(target, ids, PARAMS, depth)
    counts: dict[tuple[int, ...], int] = {}
    results: list[GenerationResult] = []

    async def many() -> None:
        c = client() if client else DeviceClient(drafter, url)
        for seed in range(n):
            if fresh_client and seed:
                await c.close()
                c = client() if client else DeviceClient(drafter, url)
            res = await c.generate(ids, make_config(seed))
            results.append(res)
            key = tuple(res.ids[:depth])
            counts[key] = counts.get(key, 0) + 1
            if fresh_connection:
                await c.close()
        await c.close()

    asyncio.run(many())
    assert all(r.exact for r in results)
    assert set(counts) <= set(law), "a sequence outside the target's support was emitted"
    keys = sorted(law, key=lambda k: -law[k])
    total = sum(law.values())
    expected = np.array([law[k] for k in keys]) * n / total
    observed = np.array([counts.get(k, 0) for k in keys], dtype=np.float64)
    big = expected >= 5
    exp = np.append(expected[big], expected[~big].sum())
    obs = np.append(observed[big], observed[~big].sum())
    if exp[-1] == 0:
        exp, obs = exp[:-1], obs[:-1]
    return float(stats.chisquare(obs, exp).pvalue), results


def conditional_pvalue(target: Any, prompt_ids: list[int], records: list[tuple]) -> float:
    """Each recorded token against the target's law given its own prefix.

    `records` are (generated prefix, token[, tag]) at positions chosen by a rule fixed
    before the token was drawn (e.g. "produced by a round whose drafts were made ahead"),
    so each token must follow P(. | prompt + prefix), also within each tag (any fact
    about the generation fixed before that token's draws, e.g. an earlier round's outcome). With top-k 2 every position is a
    Bernoulli: per prefix, (hits of the first candidate - n p) / sqrt(n p (1 - p)) is ~N(0, 1);
    the sum of squares over prefixes seen >= 10 times (the rest pooled into one term) is
    chi-square. Far more power on one mechanism than the joint law of all generations.
    """
    seq = target.new_sequence()
    seq.forward(list(prompt_ids[:-1]))
    rows: dict[tuple[int, ...], np.ndarray] = {}
    groups: dict[tuple, list[int]] = {}
    for prefix, token, *tag in records:
        if prefix not in rows:
            seq.rollback(len(prompt_ids) - 1)
            logits = seq.forward([prompt_ids[-1], *prefix])[-1]
            rows[prefix] = probabilities(logits, PARAMS).astype(np.float64)
        assert rows[prefix][token] > 0, "a token outside the target's support"
        groups.setdefault((prefix, *tag), []).append(token)
    seq.release()
    z2, dof, pool = 0.0, 0, [0.0, 0.0, 0.0]  # pooled hits, mean, variance
    for (prefix, *_), tokens in groups.items():
        p_row = rows[prefix]
        first = int(np.flatnonzero(p_row)[0])
        p = p_row[first] / p_row.sum()
        n, hits = len(tokens), sum(t == first for t in tokens)
        if n >= 10 and 0 < p < 1:
            z2 += (hits - n * p) ** 2 / (n * p * (1 - p))
            dof += 1
        else:
            pool[0] += hits
            pool[1] += n * p
            pool[2] += n * p * (1 - p)
    if pool[2] > 0:
        z2 += (pool[0] - pool[1]) ** 2 / pool[2]
        dof += 1
    assert dof > 0
    return float(stats.chi2.sf(z2, dof))


def positions_by_source(results: list[GenerationResult], sources: set[str]) -> list[tuple[tuple[int, ...], int]]:
    """(prefix, token) of every token committed by a round whose draft source is in `sources`."""
    out = []
    for r in results:
        pos = 0
        for n, src in zip(r.stats.round_tokens, r.stats.round_sources):
            if src in sources:
                out.extend((tuple(r.ids[:t]), r.ids[t]) for t in range(pos, min(pos + n, len(r.ids))))
            pos += n
    return out


@pytest.mark.slow
def test_law_with_gamma_4(tiny_target, tiny_edge, drafter):  # noqa: ANN001
    """Tokens 1-5 are one round of 4 drafts plus its bonus or correction."""
    p, results = law_pvalue(tiny_target, drafter, tiny_edge.url, 5, lambda seed: GenerationConfig(
        mode="dssd", max_new_tokens=5, sampling=PARAMS, gamma=4, seed=seed, pipeline=False))
    assert all(r.stats.gammas[0] == 4 for r in results)
    assert p > P_MIN, p


@pytest.mark.slow
def test_law_with_pipelining(tiny_target, tiny_edge, drafter):  # noqa: ANN001
    """gamma 3, pipelining on: after a round whose drafts all pass and whose bonus was guessed
    right, the next round's drafts are the ones made while waiting."""
    p, results = law_pvalue(tiny_target, drafter, tiny_edge.url, 6, lambda seed: GenerationConfig(
        mode="dssd", max_new_tokens=12, sampling=PARAMS, gamma=3, seed=seed, pipeline=True))
    kept = positions_by_source(results, {"ahead"})
    assert len(kept) > N / 2, "pipelined drafts were rarely kept"
    assert p > P_MIN, p
    p_kept = conditional_pvalue(tiny_target, drafter.tokenize(PROMPT, add_bos=False), kept)
    assert p_kept > P_MIN, p_kept


@pytest.mark.slow
def test_law_with_drafts_made_ahead_and_extended(tiny_target, tiny_edge, drafter):  # noqa: ANN001
    """A scripted controller plans 1 token ahead and then asks for 4: the draft made ahead is
    extended in line (the path `--gamma auto` takes while drafts keep passing)."""
    script = [2, 4]
    config = GenerationConfig(mode="dssd", max_new_tokens=8, sampling=PARAMS, gamma=None, pipeline=True)

    def client() -> DeviceClient:
        c = DeviceClient(drafter, tiny_edge.url)
        c._controllers[(config.mode, config.sampling, config.max_gamma, config.pipeline)] = _Scripted(script)
        return c

    def make(seed: int) -> GenerationConfig:
        return GenerationConfig(mode="dssd", max_new_tokens=8, sampling=PARAMS, gamma=None, pipeline=True, seed=seed)

    p, results = law_pvalue(tiny_target, drafter, tiny_edge.url, 6, make, client=client)
    # the plan is 1 token ahead and every round wants 2 or 4: each kept draft was extended
    extended = positions_by_source(results, {"extended"})
    assert len(extended) > N / 2, "drafts made ahead were rarely extended"
    assert p > P_MIN, p
    p_ext = conditional_pvalue(tiny_target, drafter.tokenize(PROMPT, add_bos=False), extended)
    assert p_ext > P_MIN, p_ext


@pytest.mark.slow
def test_law_with_candidates_and_more(tiny_target, tiny_edge, drafter):  # noqa: ANN001
    """One candidate per rejection: most rejections need `More` (4, 16, ... then the full row)."""
    p, results = law_pvalue(tiny_target, drafter, tiny_edge.url, 4, lambda seed: GenerationConfig(
        mode="dssd", max_new_tokens=4, sampling=PARAMS, gamma=3, seed=seed, pipeline=False,
        downlink="candidates", n_candidates=1))
    assert sum(r.stats.rounds.more_requests for r in results) > N / 10, "More was rarely sent"
    assert p > P_MIN, p


class FrameDropProxy:
    """A TCP proxy that, on each connection but those right after a drop, forwards the client's WebSocket frames up to
    and including the `drop_after`-th and then kills the connection before any reply: the
    verdict of that round is lost, whatever it was (the loss cannot depend on the content).

    It parses the client's frame boundaries (after the HTTP upgrade), so the drop point is
    a frame count, not a TCP chunk count.
    """

    def __init__(self, upstream_port: int, drop_after: int, *, stay_down: bool = False,
                 spare_resume: bool = True) -> None:
        """`stay_down`: after the first drop, refuse every new connection (the edge is gone).
        `spare_resume=False`: drop on every connection (resumes go to another edge)."""
        self.upstream_port, self.drop_after, self.stay_down = upstream_port, drop_after, stay_down
        self.spare_resume = spare_resume
        self._server: asyncio.AbstractServer | None = None
        self.connections = 0
        self.drops = 0
        self._last_dropped = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @staticmethod
    def _frame_end(buf: bytes | bytearray, start: int) -> int | None:
        """End offset of the masked client frame starting at `start`, or None if incomplete."""
        if len(buf) < start + 2:
            return None
        n = buf[start + 1] & 0x7F
        head = 2
        if n == 126:
            if len(buf) < start + 4:
                return None
            n, head = int.from_bytes(buf[start + 2:start + 4], "big"), 4
        elif n == 127:
            if len(buf) < start + 10:
                return None
            n, head = int.from_bytes(buf[start + 2:start + 10], "big"), 10
        end = start + head + 4 + n  # client frames carry a 4-byte mask
        return end if len(buf) >= end else None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        dropping = not self._last_dropped  # the resumed connection after a drop is left alone
        self._last_dropped = False
        dropping = dropping or not self.spare_resume
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def down() -> None:
            try:
                while data := await up_reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        task = asyncio.ensure_future(down())
        buf = bytearray()
        pos = None  # start of the next client frame, once the upgrade request has passed
        frames = 0
        try:
            while data := await reader.read(65536):
                buf += data
                if pos is None:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        continue
                    pos = end + 4
                cut = None
                while dropping and (end := self._frame_end(buf, pos)) is not None:
                    frames += 1
                    pos = end
                    if frames == self.drop_after:
                        cut = end
                        break
                if cut is not None:
                    up_writer.write(bytes(buf[:cut]))
                    await up_writer.drain()
                    self.drops += 1
                    self._last_dropped = True
                    if self.stay_down and self._server is not None:
                        self._server.close()  # new connections are refused from now on
                    writer.transport.abort()  # the reply never reaches the device
                    up_writer.transport.abort()
                    return
                keep = pos if dropping else len(buf)  # an incomplete frame waits for its rest
                up_writer.write(bytes(buf[:keep]))
                await up_writer.drain()
                del buf[:keep]
                pos = 0
        except (ConnectionError, OSError):
            pass
        finally:
            up_writer.close()
            task.cancel()

    def __enter__(self) -> "FrameDropProxy":
        self._thread.start()

        async def start() -> asyncio.AbstractServer:
            return await asyncio.start_server(self._client, "127.0.0.1", 0)

        self._server = asyncio.run_coroutine_threadsafe(start(), self._loop).result()
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)


@pytest.mark.slow
def test_law_with_a_resume_after_a_dropped_round(tiny_target, tiny_edge, drafter):  # noqa: ANN001
    """Every generation loses the verdict of its second round (frames: Hello, Start, Draft 1,
    Draft 2) and resumes on a new connection from what it committed, with a derived seed."""
    port = int(tiny_edge.url.rsplit(":", 1)[1])
    with FrameDropProxy(port, drop_after=4) as proxy:
        p, results = law_pvalue(tiny_target, drafter, f"ws://127.0.0.1:{proxy.port}", 6, lambda seed: GenerationConfig(
            mode="dssd", max_new_tokens=8, sampling=PARAMS, gamma=3, seed=seed, pipeline=False), n=3000,
            fresh_connection=True)
    assert sum(r.stats.reconnects for r in results) == proxy.drops > 0.95 * 3000, proxy.drops
    assert p > P_MIN, p
    # the first token after the resume, per prefix and per outcome of the round before the
    # drop (both fixed before its draws): a replayed edge stream (the same seed again) would
    # test it with the very uniforms that accepted or rejected that round's drafts
    resumed = [(tuple(r.ids[:at]), r.ids[at], r.stats.round_tokens[0]) for r in results
               for at in r.stats.resumed_at[:1] if at < len(r.ids)]
    p_resumed = conditional_pvalue(tiny_target, drafter.tokenize(PROMPT, add_bos=False), resumed)
    assert p_resumed > P_MIN, p_resumed
