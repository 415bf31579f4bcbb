"""`logprobs` and `n`: the target's log-probabilities of the emitted tokens, and n choices.

The reference is independent of the protocol: one transformers forward of the target over
prompt + output, `torch.log_softmax` of its logits at each emitted position. Every edge
mode (greedy and sampled, every downlink, so accepted, bonus, correction and resampled
tokens all occur) must report exactly those values, to float rounding, through the real
stack (llama.cpp drafter, WebSocket edge), the library and the OpenAI server.
"""
from __future__ import annotations

import asyncio

import numpy as np
import openai
import pytest
import torch

from device_runtime import DeviceRuntime, RequestError
from device_runtime.drafter import LlamaDrafter
from device_runtime.openai_server import OpenAIServerThread
from device_runtime.session import DeviceClient, GenerationConfig
from edge_service.session import EdgeLimits, EdgeSession
from protocol import logprobs as lp
from protocol import wire
from protocol.checks import check_logprobs
from protocol.sampling import SamplingParams, choice_seed, resume_seed
from protocol.verification import VerdictKind
from protocol.vocab import vocab_fingerprint
from tests.test_end_to_end import reference_greedy

PROMPT = "The cat sat on the"
K = 3
#: float32 log-softmax on two code paths (numpy here, torch there): rounding only
TOL = 2e-4


@pytest.fixture(scope="module")
def drafter(tiny_pair):  # noqa: ANN001
    d = LlamaDrafter(tiny_pair.draft_gguf, n_ctx=512, n_threads=1, f32_kv_cache=True)
    yield d
    d.close()


@pytest.fixture(scope="module")
def runtime(tiny_pair, tiny_edge):  # noqa: ANN001
    d = LlamaDrafter(tiny_pair.draft_gguf, n_ctx=512, n_threads=1, f32_kv_cache=True)
    rt = DeviceRuntime(edge_url=tiny_edge.url, drafters=[d], model_name="tiny-draft")
    yield rt
    rt.close()
    d.close()


@pytest.fixture(scope="module")
def client(runtime):  # noqa: ANN001
    with OpenAIServerThread(runtime) as srv:
        yield openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=120)


def reference_logprobs(target, prompt: list[int], out: list[int]) -> torch.Tensor:  # noqa: ANN001
    """(len(out), V) log-softmax rows of the target at each emitted position: one forward."""
    with torch.inference_mode():
        logits = target.model(torch.tensor([prompt + out])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : len(prompt) + len(out) - 1]


def assert_matches(ref: torch.Tensor, ids: list[int], entries: list, k: int) -> None:
    assert len(entries) == len(ids) and all(e is not None for e in entries)
    for i, (tok, (value, top)) in enumerate(zip(ids, entries)):
        assert value == pytest.approx(float(ref[i, tok]), abs=TOL), i
        want_top = torch.topk(ref[i], k)
        assert [t for t, _ in top] == want_top.indices.tolist(), i
        assert [v for _, v in top] == pytest.approx(want_top.values.tolist(), abs=TOL)


def _run(drafter: LlamaDrafter, url: str, prompt: list[int], configs: list[GenerationConfig]) -> list:
    async def go() -> list:
        c = DeviceClient(drafter, url, client_name="pytest")
        try:
            return [await c.generate(prompt, cfg) for cfg in configs]
        finally:
            await c.close()

    return asyncio.run(go())


# -- pure: math, wire, checks -------------------------------------------------------------


def test_log_softmax_and_top_entries_match_torch_with_ties_to_the_lower_id() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((5, 300)) * 4).astype(np.float32)
    logits[2, [7, 3, 250]] = 20.0  # a three-way tie at the top
    logits[3, :] = -np.inf
    logits[3, [11, 12]] = 1.0
    got = lp.log_softmax(logits)
    want = torch.log_softmax(torch.from_numpy(logits), dim=-1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    ids, vals = lp.top_entries(got, 4)
    assert ids[2, :3].tolist() == [3, 7, 250]
    assert ids[3, :2].tolist() == [11, 12] and np.all(np.isneginf(vals[3, 2:]))
    block = lp.of_logits(logits, np.array([0, 1, 3, 11, 2]), 4)
    assert block.n == 5 and block.k == 4 and block.logprob[3] == pytest.approx(np.log(0.5), abs=1e-6)


def _block(n: int, k: int, wide: bool = False) -> lp.TokenLogprobs:
    rng = np.random.default_rng(n)
    ids = np.tile(np.arange(k, dtype=np.int32) + (70000 if wide else 5), (n, 1))
    top = -np.sort(rng.random((n, k)).astype(np.float32), axis=1)  # descending
    return lp.TokenLogprobs(-rng.random(n).astype(np.float32), ids, top)


@pytest.mark.parametrize("wide", [False, True])
def test_wire_carries_logprobs_only_when_asked(wide: bool) -> None:
    block = _block(3, 2, wide)
    for msg in (wire.VerdictMsg(VerdictKind.BONUS, 2, 9, logprobs=block),
                wire.VerdictMsg(VerdictKind.RESAMPLE, 2, p_ids=np.array([1, 4], np.int32),
                                p_values=np.array([0.5, 0.5], np.float32), logprobs=block),
                wire.Tokens(np.array([1, 2, 3], np.int32), True, logprobs=block)):
        back = wire.decode(wire.encode(msg)).message
        np.testing.assert_array_equal(back.logprobs.logprob, block.logprob)
        np.testing.assert_array_equal(back.logprobs.top_ids, block.top_ids)
        np.testing.assert_array_equal(back.logprobs.top_logprobs, block.top_logprobs)
    plain = wire.encode(wire.VerdictMsg(VerdictKind.BONUS, 2, 9))
    with_lp = wire.encode(wire.VerdictMsg(VerdictKind.BONUS, 2, 9, logprobs=lp.TokenLogprobs.empty(0)))
    assert len(plain) == wire.HEADER_SIZE + 7  # nothing extra unless asked
    # 4 bytes head; chosen-only logprobs cost 4 bytes per token, alternatives 6 (8 wide) each
    n, k = 3, 2
    cost = len(wire.encode(wire.VerdictMsg(VerdictKind.BONUS, 2, 9, logprobs=block))) - len(plain)
    assert cost == 4 + 4 * n + (8 if wide else 6) * n * k
    assert len(with_lp) == len(plain) + 4
    start = wire.Start("dssd", SamplingParams(), 1, 8, np.array([1, 2], np.int32))
    assert b"logprobs" not in wire.encode(start)
    assert wire.decode(wire.encode(wire.Start("dssd", SamplingParams(), 1, 8, np.array([1]), logprobs=5))
                       ).message.logprobs == 5
    end = wire.decode(wire.encode(wire.End(12, (7,)))).message
    assert end == wire.End(12, (7,)) and wire.decode(wire.encode(wire.End(12))).message == wire.End(12)
    bad = bytearray(wire.encode(wire.VerdictMsg(VerdictKind.BONUS, 2, 9, logprobs=block)))
    with pytest.raises(wire.Truncated):
        wire.decode(bytes(bad[:-3]))


def test_checks_refuse_logprobs_that_do_not_fit() -> None:
    good = _block(3, 2)
    check_logprobs(good, n=3, k=2, n_vocab=100, where="Verdict")
    bad = [
        (None, "no logprobs"),
        (_block(2, 2), "expected 3"),
        (lp.TokenLogprobs(np.array([0.5, -1, -1], np.float32), good.top_ids, good.top_logprobs), "outside"),
        (lp.TokenLogprobs(np.array([np.nan, -1, -1], np.float32), good.top_ids, good.top_logprobs), "outside"),
        (lp.TokenLogprobs(good.logprob, good.top_ids + 200, good.top_logprobs), "vocabulary"),
        (lp.TokenLogprobs(good.logprob, np.zeros((3, 2), np.int32), good.top_logprobs), "repeat"),
        (lp.TokenLogprobs(good.logprob, good.top_ids, good.top_logprobs[:, ::-1].copy()), "order"),
    ]
    for block, why in bad:
        with pytest.raises(wire.Malformed, match=why):
            check_logprobs(block, n=3, k=2, n_vocab=100, where="Verdict")


def test_choice_seeds_are_distinct_and_keep_choice_zero() -> None:
    seeds = [choice_seed(1234, i) for i in range(16)]
    assert seeds[0] == 1234 and len(set(seeds)) == 16 and all(0 <= s < 2**63 for s in seeds)
    assert not set(seeds[1:]) & {resume_seed(1234, a) for a in range(1, 16)}


# -- the real stack -----------------------------------------------------------------------


@pytest.mark.parametrize("mode,sampling,downlink", [
    ("dssd", SamplingParams(0.0), "auto"),  # greedy: accepted + correction / bonus
    ("dssd", SamplingParams(1.0), "candidates"),  # sampled: resampled ids, More, the End tail
    ("dssd", SamplingParams(0.8, top_k=20), "support"),
    ("dssd-paper", SamplingParams(1.0), "full"),
    ("dsd", SamplingParams(1.0), "auto"),
    ("edge-only", SamplingParams(1.0), "auto"),
])
def test_logprobs_equal_a_direct_transformers_forward(mode, sampling, downlink, drafter, tiny_target,  # noqa: ANN001
                                                      tiny_edge) -> None:
    prompt = drafter.tokenize(PROMPT, add_bos=False)
    configs = [GenerationConfig(mode=mode, max_new_tokens=40, sampling=sampling, gamma=4, seed=seed,
                                downlink=downlink, logprobs=K) for seed in (1, 2, 3)]
    results = _run(drafter, tiny_edge.url, prompt, configs)
    resampled = 0
    for res in results:
        assert res.exact and res.ids
        assert_matches(reference_logprobs(tiny_target, prompt, res.ids), res.ids, res.logprobs, K)
        resampled += res.stats.rounds.rounds - res.stats.rounds.accepted_tokens  # rough: rejections
    # the same seed without logprobs gives the same tokens: asking for them changes nothing
    plain = _run(drafter, tiny_edge.url, prompt, [GenerationConfig(
        mode=mode, max_new_tokens=40, sampling=sampling, gamma=4, seed=1, downlink=downlink)])[0]
    assert plain.ids == results[0].ids and plain.logprobs is None


def test_logprobs_stream_with_their_tokens_and_refusals(runtime, tiny_target) -> None:  # noqa: ANN001
    prompt = runtime.tokenize(PROMPT, add_bos=False)
    s = runtime.stream(prompt, max_tokens=30, temperature=1.0, seed=7, gamma=3, logprobs=2)
    pieces = list(s)
    ids = [t for p in pieces for t in p.ids]
    assert ids == s.result.ids and all(len(p.logprobs) == len(p.ids) for p in pieces)
    entries = [(e.logprob, [(i, v) for i, _, v in e.top]) for p in pieces for e in p.logprobs]
    assert_matches(reference_logprobs(tiny_target, prompt, ids), ids, entries, 2)
    assert s.result.logprobs[0].token == runtime._drafters[0].detokenize([ids[0]])
    with pytest.raises(RequestError) as e:
        runtime.generate(prompt, mode="device-only", logprobs=1)
    assert e.value.param == "logprobs"
    with pytest.raises(RequestError):
        runtime.generate(prompt, logprobs=21)
    with pytest.raises(RequestError) as e:
        runtime.generate(prompt, n=0)
    assert e.value.param == "n"


def test_openai_client_logprobs_chat_and_completions(client, runtime, tiny_target) -> None:  # noqa: ANN001
    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    chat_ids = runtime.tokenize(runtime.chat_prompt(msgs), add_bos=False)
    fixed = {"gamma": 3}  # same seed, same sample (auto gamma follows timings: same law only)
    r = client.chat.completions.create(model="tiny-draft", messages=msgs, max_tokens=12, temperature=0.7,
                                       seed=3, logprobs=True, top_logprobs=2, extra_body=fixed)
    content = r.choices[0].message.content
    openai_defaults = {"top_k": 0, "top_p": 1.0}  # the server keeps OpenAI's, the library has its own
    lib = runtime.generate(messages=msgs, max_tokens=12, temperature=0.7, seed=3, logprobs=2, gamma=3,
                           **openai_defaults)
    assert content == lib.text
    got = r.choices[0].logprobs.content
    assert len(got) == len(lib.ids)
    ref = reference_logprobs(tiny_target, chat_ids, lib.ids)
    for i, (item, tok) in enumerate(zip(got, lib.ids)):
        assert item.logprob == pytest.approx(float(ref[i, tok]), abs=TOL)
        assert len(item.top_logprobs) == 2 and bytes(item.bytes) == runtime._drafters[0].detokenize([tok])
    chunks = list(client.chat.completions.create(model="tiny-draft", messages=msgs, max_tokens=12,
                                                 temperature=0.7, seed=3, logprobs=True, stream=True,
                                                 extra_body=fixed))
    streamed = [c for ch in chunks for choice in ch.choices if choice.logprobs
                for c in choice.logprobs.content]
    assert [c.logprob for c in streamed] == [c.logprob for c in got]
    comp = client.completions.create(model="tiny-draft", prompt=PROMPT, max_tokens=10, temperature=0,
                                     logprobs=2)
    ids = runtime.tokenize(PROMPT, add_bos=True)
    want = reference_greedy(tiny_target, ids, 10)
    ref = reference_logprobs(tiny_target, ids, want[: len(comp.choices[0].logprobs.token_logprobs)])
    for i, v in enumerate(comp.choices[0].logprobs.token_logprobs):
        assert v == pytest.approx(float(ref[i, want[i]]), abs=TOL)
    assert all(len(t) <= 2 for t in comp.choices[0].logprobs.top_logprobs)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-draft", messages=msgs, top_logprobs=2)
    plain = client.chat.completions.create(model="tiny-draft", messages=msgs, max_tokens=4)
    assert plain.choices[0].logprobs is None


# -- n > 1 --------------------------------------------------------------------------------


def test_n_choices_are_independent_samples_sharing_the_prefill(client, runtime, tiny_target) -> None:  # noqa: ANN001
    prompt = runtime.tokenize(PROMPT, add_bos=False)
    s = runtime.stream(prompt, max_tokens=20, temperature=1.0, seed=11, n=3, logprobs=0, gamma=3)
    pieces = list(s)
    res = s.results
    assert [r.index for r in res] == [0, 1, 2] and [r.seed for r in res] == [choice_seed(11, i) for i in range(3)]
    for r in res:  # each choice is the request with its own seed, alone
        alone = runtime.generate(prompt, max_tokens=20, temperature=1.0, seed=r.seed, gamma=3)
        assert alone.ids == r.ids and r.text == "".join(p.text for p in pieces if p.index == r.index)
        assert_matches(reference_logprobs(tiny_target, prompt, r.ids), r.ids,
                       [(e.logprob, []) for e in r.logprobs], 0)
    assert len({tuple(r.ids) for r in res}) > 1  # 20 tokens at T=1 from a random model differ
    # the prompt is prefilled once: later choices find it in the edge's cache
    assert res[0].stats.edge["prefill_tokens"] > 0
    assert all(r.stats.edge["prefill_tokens"] == 0 for r in res[1:])

    out = client.completions.create(model="tiny-draft", prompt=PROMPT, max_tokens=8, temperature=1.0,
                                    seed=5, n=3, extra_body={"gamma": 3})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    openai_defaults = {"top_k": 0, "top_p": 1.0}
    lib = runtime.generate(PROMPT, max_tokens=8, temperature=1.0, seed=5, n=3, gamma=3, **openai_defaults)
    assert out.choices[0].text == lib.text
    n_out = sum(len(runtime.generate(PROMPT, max_tokens=8, temperature=1.0, seed=choice_seed(5, i), gamma=3,
                                     **openai_defaults).ids) for i in range(3))
    assert out.usage.prompt_tokens == lib.prompt_tokens
    assert out.usage.completion_tokens == n_out
    assert out.usage.total_tokens == out.usage.prompt_tokens + n_out
    msgs = [{"role": "user", "content": "Hi"}]
    chunks = list(client.chat.completions.create(model="tiny-draft", messages=msgs, max_tokens=6, n=2,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    texts: dict[int, str] = {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert set(texts) == {0, 1} and texts[0] == texts[1]  # greedy: both choices are the target's argmax path
    assert chunks[-1].usage.completion_tokens == 2 * len(runtime.generate(messages=msgs, max_tokens=6,
                                                                         temperature=0, **openai_defaults).ids)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-draft", prompt=PROMPT, n=17)


def test_the_numpy_edge_path_reports_the_same_logprobs(tiny_target, drafter) -> None:  # noqa: ANN001
    """`EdgeSession.verify` (the unbatched path) as the server's batched one: every token of a
    round, the resampled one one frame later, and the last one in Done."""
    session = EdgeSession(tiny_target, EdgeLimits(), 1)
    session.hello(wire.Hello(wire.VERSION, vocab_fingerprint(tiny_target.vocab_tokens), tiny_target.n_vocab))
    prompt = drafter.tokenize(PROMPT, add_bos=False)
    want = reference_greedy(tiny_target, prompt, 6)
    session.start(wire.Start("dssd", SamplingParams(0.0), 1, 8, np.array(prompt, np.int32), logprobs=K))
    v = session.verify(wire.Draft(len(prompt), np.zeros(0, np.int32), np.array(want[:3], np.int32)))
    assert v.kind is VerdictKind.BONUS and v.token == want[3] and v.logprobs.n == 4
    ref = reference_logprobs(tiny_target, prompt, want[:4])
    assert_matches(ref, want[:4], v.logprobs.entries(), K)
    session.end(wire.End(len(prompt) + 4))
    # sampled: a rejection's resampled token gets its logprob with the next verdict / in Done
    session.start(wire.Start("dssd", SamplingParams(1.0), 5, 8, np.array(prompt, np.int32), downlink="full",
                             logprobs=K))
    bad = int(np.argmin(reference_logprobs(tiny_target, prompt, want[:1])[0]))  # the least likely first id
    v = session.verify(wire.Draft(len(prompt), np.zeros(0, np.int32), np.array([bad], np.int32),
                                  q_draft=np.ones(1, np.float32)))
    assert v.kind is VerdictKind.RESAMPLE and v.n_accepted == 0 and v.logprobs.n == 0
    resampled = int(np.argmax(v.p_full))
    done = session.end(wire.End(len(prompt) + 1, (resampled,)))
    tail = lp.from_json(done.stats["logprobs"], K)
    assert_matches(reference_logprobs(tiny_target, prompt, [resampled]), [resampled], tail.entries(), K)
    session.close()
