"""Structured output stays exact: the grammar's mask is part of the sampling contract.

References are independent of the protocol's rounds: transformers' own `generate` driven
by the same grammar engine through a logits processor (greedy), and the constrained
target's exact law of the first two tokens from its logits (sampled, chi-square). A mask
applied on one side only is caught: without it on the device, drafts leave the grammar
and the edge refuses them; without it on the edge, tokens outside the grammar's support
are emitted (the support assertion) and the law differs (the test has the power to see
the unconstrained law, checked below).
"""
from __future__ import annotations

import json

import numpy as np
import openai
import pydantic
import pytest
import torch
from scipy import stats
from transformers import LogitsProcessor, LogitsProcessorList

from device_runtime import DeviceRuntime
from device_runtime.drafter import LlamaDrafter
from device_runtime.grammar import structured, tools_grammar
from device_runtime.openai_server import OpenAIServerThread
from device_runtime.session import DeviceClient, GenerationConfig
from edge_service.session import EdgeLimits, EdgeSession, ProtocolError
from protocol import constraints as cs
from protocol import wire
from protocol.sampling import SamplingParams, probabilities
from protocol.verification import VerdictKind
from protocol.vocab import vocab_fingerprint
from tests.test_logprobs import _run

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
          "required": ["ok", "n"], "additionalProperties": False}
PROMPT = "The cat sat on the"


@pytest.fixture(scope="module")
def drafter(tiny_pair):  # noqa: ANN001
    d = LlamaDrafter(tiny_pair.draft_gguf, n_ctx=512, n_threads=1, f32_kv_cache=True)
    yield d
    d.close()


def target_constraint(target, spec: cs.GrammarSpec) -> cs.Constraint:  # noqa: ANN001
    tok = cs.build_tokenizer(target.vocab_tokens, target.eos_token_ids, target.n_vocab)
    return cs.Constraint(tok, spec, target.n_vocab)


class GrammarProcessor(LogitsProcessor):
    """The grammar engine driving transformers' `generate` (batch of one)."""

    def __init__(self, constraint: cs.Constraint, n_prompt: int) -> None:
        self.c, self.n_prompt = constraint, n_prompt

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        new = input_ids[0, self.n_prompt :].tolist()
        if new:
            self.c.advance(new[-1:])
        words, _ = self.c.masks([])
        allowed = torch.from_numpy(cs.unpack(words[0], scores.shape[1]))
        return scores.masked_fill(~allowed, float("-inf"))


def reference_constrained_greedy(target, prompt: list[int], spec: cs.GrammarSpec, n: int) -> list[int]:  # noqa: ANN001
    model = target.model
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, pad_token_id=model.generation_config.eos_token_id,
                             logits_processor=LogitsProcessorList([GrammarProcessor(target_constraint(target, spec),
                                                                                    len(prompt))]))
    return out[0, len(prompt) :].tolist()


# -- pure ---------------------------------------------------------------------------------


def test_spec_travels_in_start_and_refuses_another_engine_version() -> None:
    spec = cs.json_schema_spec(SCHEMA, 3)
    start = wire.Start("dssd", SamplingParams(), 1, 8, np.array([1, 2, 3, 4], np.int32), grammar=spec.as_json())
    back = cs.GrammarSpec.from_json(wire.decode(wire.encode(start)).message.grammar)
    assert back == spec
    back.check()
    with pytest.raises(cs.ConstraintError, match="engine"):
        cs.GrammarSpec("json_schema", "{}", 0, version="0.0.1").check()
    with pytest.raises(cs.ConstraintError, match="kind"):
        cs.GrammarSpec("ebnf", "x", 0).check()
    with pytest.raises(cs.ConstraintError):
        cs.GrammarSpec.from_json({"kind": "lark"})


def test_masks_follow_the_grammar_on_the_tiny_vocabulary(tiny_target) -> None:  # noqa: ANN001
    c = target_constraint(tiny_target, cs.json_schema_spec(SCHEMA, 0))
    words, ok = c.masks([])
    first = np.flatnonzero(cs.unpack(words[0], tiny_target.n_vocab))
    texts, _ = cs.token_bytes(tiny_target.vocab_tokens)
    assert first.size and all(texts[i].startswith(b"{") for i in first)
    eos = tiny_target.eos_token_ids[0]
    assert not cs.unpack(words[0], tiny_target.n_vocab)[eos]  # no EOS before the object is complete
    logits = np.zeros(tiny_target.n_vocab, np.float32)
    c.apply(logits, words[0])
    assert np.flatnonzero(np.isfinite(logits)).tolist() == first.tolist()


# -- greedy: equal to the constrained target alone ---------------------------------------------


@pytest.mark.parametrize("mode", ["dssd", "dsd", "edge-only", "dssd-paper"])
def test_constrained_greedy_equals_generate_with_the_same_grammar(mode, drafter, tiny_target, tiny_edge) -> None:  # noqa: ANN001
    spec = cs.json_schema_spec(SCHEMA, 0)
    for prompt_text in (PROMPT, "Hello world"):
        prompt = drafter.tokenize(prompt_text, add_bos=False)
        want = reference_constrained_greedy(tiny_target, prompt, spec, 40)
        got = _run(drafter, tiny_edge.url, prompt, [GenerationConfig(
            mode=mode, max_new_tokens=40, sampling=SamplingParams(0.0), gamma=g, grammar=spec) for g in (1, 4)])
        for res in got:
            assert res.ids == want, (mode, prompt_text)
        texts, _ = cs.token_bytes(tiny_target.vocab_tokens)
        assert b"".join(texts[i] for i in want if i not in tiny_target.eos_token_ids).startswith(b'{"ok":')


def test_unconstrained_and_constrained_differ_and_bad_grammars_are_refused(drafter, tiny_edge) -> None:  # noqa: ANN001
    prompt = drafter.tokenize(PROMPT, add_bos=False)
    free, json_out = _run(drafter, tiny_edge.url, prompt, [
        GenerationConfig(max_new_tokens=12, sampling=SamplingParams(0.0), gamma=3),
        GenerationConfig(max_new_tokens=12, sampling=SamplingParams(0.0), gamma=3,
                         grammar=cs.json_schema_spec(SCHEMA, 0))])
    assert free.ids != json_out.ids and json_out.text.startswith("{")
    with pytest.raises(cs.ConstraintError):  # the device compiles it first: refused before any frame
        _run(drafter, tiny_edge.url, prompt, [GenerationConfig(
            max_new_tokens=4, grammar=cs.GrammarSpec("lark", "start: undefined_rule", 0))])


def test_the_edge_refuses_another_engine_version_or_a_broken_grammar(tiny_target) -> None:  # noqa: ANN001
    session = EdgeSession(tiny_target, EdgeLimits(), 1)
    session.hello(wire.Hello(wire.VERSION, vocab_fingerprint(tiny_target.vocab_tokens), tiny_target.n_vocab))
    for grammar, why in ((dict(cs.json_schema_spec(SCHEMA, 0).as_json(), version="0.0.1"), "engine"),
                         (cs.GrammarSpec("lark", "start: undefined_rule", 0).as_json(), "compile"),
                         ({"kind": "lark"}, "grammar")):
        with pytest.raises(ProtocolError, match=why) as e:
            session.start(wire.Start("dssd", SamplingParams(0.0), 1, 4, np.array([5, 6], np.int32),
                                     grammar=grammar))
        assert e.value.code == wire.ErrorCode.UNSUPPORTED
    session.close()


# -- sampled: the constrained target's law --------------------------------------------------


LETTERS = cs.GrammarSpec("lark", 'start: /[a-e]+/', 0)


def _exact_first_two(target, prompt: list[int], spec: cs.GrammarSpec, params: SamplingParams,  # noqa: ANN001
                     masked: bool = True) -> dict[tuple[int, int], float]:
    """The (masked or plain) target's exact law of the first two sampled tokens."""
    c = target_constraint(target, spec)
    seq = target.new_sequence()
    row = seq.forward(prompt)[-1]
    words, _ = c.masks([])
    if masked:
        c.apply(row, words[0])
    p1 = probabilities(row, params).astype(np.float64)
    law = {}
    for a in np.flatnonzero(p1):
        seq.rollback(len(prompt))
        row = seq.forward([int(a)])[-1]
        if masked:
            words, _ = c.masks([int(a)])  # row 1: the mask after a
            c.apply(row, words[1])
        p2 = probabilities(row, params).astype(np.float64)
        for b in np.flatnonzero(p2):
            law[(int(a), int(b))] = p1[a] * p2[b]
    seq.release()
    return law


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "downlink", "n"), [("dssd", "auto", 1500), ("dsd", "auto", 800)])
def test_constrained_sampled_first_tokens_follow_the_constrained_target(mode, downlink, n, drafter, tiny_target,  # noqa: ANN001
                                                                       tiny_edge) -> None:
    params = SamplingParams(1.0)
    prompt = drafter.tokenize(PROMPT, add_bos=False)
    law = _exact_first_two(tiny_target, prompt, LETTERS, params)
    configs = [GenerationConfig(mode=mode, max_new_tokens=2, sampling=params, gamma=3, seed=seed,
                                downlink=downlink, grammar=LETTERS) for seed in range(n)]
    counts: dict[tuple[int, int], int] = {}
    for res in _run(drafter, tiny_edge.url, prompt, configs):
        key = (res.ids[0], res.ids[1])
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(law), "a pair outside the constrained target's support was emitted"
    keys = sorted(law)
    observed = np.array([counts.get(k, 0) for k in keys])
    total = sum(law.values())
    expected = np.array([law[k] for k in keys]) * n / total
    # pool sparse cells so the chi-square approximation holds
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    # power: the unconstrained target puts most of its mass outside the grammar, so an edge
    # that skipped the mask (bonus and residual from unmasked P) would emit pairs outside the
    # support above in almost every one of the n runs, and a device that skipped it would
    # draft ids the edge refuses
    free = _exact_first_two(tiny_target, prompt, LETTERS, params, masked=False)
    outside = sum(v for k, v in free.items() if k not in law) / sum(free.values())
    assert outside > 0.5


# -- the openai client, unchanged ------------------------------------------------------------


class Answer(pydantic.BaseModel):
    ok: bool
    n: int = pydantic.Field(ge=0, le=99)


@pytest.fixture(scope="module")
def client(tiny_pair, tiny_edge):  # noqa: ANN001
    d = LlamaDrafter(tiny_pair.draft_gguf, n_ctx=1024, n_threads=1, f32_kv_cache=True)
    rt = DeviceRuntime(edge_url=tiny_edge.url, drafters=[d], model_name="tiny-draft")
    with OpenAIServerThread(rt) as srv:
        yield openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=120)
    rt.close()
    d.close()


def _parse(client: openai.OpenAI, **kw):  # noqa: ANN003, ANN202
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    return parse(**kw)


def test_openai_parse_with_a_pydantic_model(client) -> None:  # noqa: ANN001
    r = _parse(client, model="tiny-draft", messages=[{"role": "user", "content": "Answer."}],
               response_format=Answer, max_tokens=60, temperature=0)
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(r.choices[0].message.parsed, Answer)
    r = client.chat.completions.create(model="tiny-draft", messages=[{"role": "user", "content": "JSON"}],
                                       response_format={"type": "json_object"}, max_tokens=40, temperature=0.8,
                                       seed=1)
    assert r.choices[0].message.content.startswith("{")


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}


def test_openai_tool_calling_loop(client) -> None:  # noqa: ANN001
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model="tiny-draft", messages=messages, tools=[WEATHER],
                                       tool_choice="required", max_tokens=60, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    # the loop: the call and its result go back, the model answers (here: free text)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r2 = client.chat.completions.create(model="tiny-draft", messages=messages, tools=[WEATHER],
                                        tool_choice="none", max_tokens=8, temperature=0)
    assert r2.choices[0].finish_reason in ("stop", "length") and r2.choices[0].message.tool_calls is None
    named = client.chat.completions.create(
        model="tiny-draft", messages=messages[:1], tools=[WEATHER], max_tokens=60, temperature=0.7, seed=2,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True)
    calls = [tc for ch in named for c in ch.choices if c.delta.tool_calls for tc in c.delta.tool_calls]
    assert calls and calls[0].function.name == "get_weather"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-draft", messages=messages[:1], tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


def test_structured_mapping() -> None:
    assert structured(None, None, None).grammar is None
    assert structured({"type": "json_object"}, None, None).grammar.kind == "json_schema"
    assert tools_grammar([WEATHER], "auto").kind == "lark"
    assert tools_grammar([WEATHER], "none") is None


def test_the_numpy_edge_path_masks_and_refuses_drafts_outside_the_grammar(tiny_target, drafter) -> None:  # noqa: ANN001
    spec = cs.json_schema_spec(SCHEMA, 0)
    prompt = drafter.tokenize(PROMPT, add_bos=False)
    want = reference_constrained_greedy(tiny_target, prompt, spec, 6)
    session = EdgeSession(tiny_target, EdgeLimits(), 1)
    session.hello(wire.Hello(wire.VERSION, vocab_fingerprint(tiny_target.vocab_tokens), tiny_target.n_vocab))
    start = wire.Start("dssd", SamplingParams(0.0), 1, 16, np.array(prompt, np.int32),
                       grammar=cs.json_schema_spec(SCHEMA, len(prompt)).as_json())  # the output follows the prompt
    session.start(start)
    v = session.verify(wire.Draft(len(prompt), np.zeros(0, np.int32), np.array(want[:2], np.int32)))
    assert (v.kind, v.n_accepted, v.token) == (VerdictKind.BONUS, 2, want[2])
    ref = target_constraint(tiny_target, spec)
    ref.advance(want[:3])
    words, _ = ref.masks([])
    outside = int(np.flatnonzero(~cs.unpack(words[0], tiny_target.n_vocab))[0])
    with pytest.raises(ProtocolError, match="not allowed by the grammar"):
        session.verify(wire.Draft(len(prompt) + 3, np.zeros(0, np.int32), np.array([outside], np.int32)))
    session.close()
