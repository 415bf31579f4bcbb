"""The device API: `DeviceRuntime` (library) and the OpenAI-compatible server, on the tiny pair.

The official `openai` client talks to the local server (chat and completions, streamed or
not); greedy output must equal transformers' own `generate` on the target; concurrent
streams must both finish correctly; bad requests get 4xx in OpenAI's error format.
"""
from __future__ import annotations

import asyncio
import codecs
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from device_runtime import ContextLengthError, DeviceRuntime, RequestError
from device_runtime.drafter import LlamaDrafter
from device_runtime.openai_server import OpenAIServerThread
from edge_service.server import EdgeServerThread, ServerConfig
from tests.test_end_to_end import reference_greedy

MODEL = "tiny-draft"
PROMPT = "The cat sat on the"
QUESTION = "Why is the sky blue?"


@pytest.fixture(scope="module")
def runtime(tiny_pair, tiny_edge):  # noqa: ANN001
    drafter = LlamaDrafter(tiny_pair.draft_gguf, n_ctx=512, n_threads=1, f32_kv_cache=True)
    rt = DeviceRuntime(edge_url=tiny_edge.url, drafters=[drafter], model_name=MODEL)
    yield rt
    rt.close()
    drafter.close()


@pytest.fixture(scope="module")
def server(runtime):  # noqa: ANN001
    with OpenAIServerThread(runtime) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:  # noqa: ANN001
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def _chat_ids(runtime: DeviceRuntime, content: str) -> list[int]:
    return runtime.tokenize(runtime.chat_prompt([{"role": "user", "content": content}]), add_bos=False)


def _greedy_text(runtime: DeviceRuntime, target, prompt_ids: list[int], n: int) -> tuple[str, list[int]]:  # noqa: ANN001
    """transformers' greedy continuation, cut at the target's EOS, as text and ids.

    Text is decoded as the runtime streams it: incrementally, so an incomplete UTF-8
    sequence at the very end (random tiny model, max_tokens cut) is not shown.
    """
    ids = reference_greedy(target, prompt_ids, n)
    eos = set(target.eos_token_ids)
    end = next((i for i, t in enumerate(ids) if t in eos), None)
    visible = ids if end is None else ids[:end]
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(runtime._drafters[0].detokenize(visible))
    return text, ids if end is None else ids[: end + 1]


def _post(url: str, body: bytes | str, *, content_type: str = "application/json") -> tuple[int, dict]:
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# -- library API -----------------------------------------------------------------------


def test_library_generate_and_stream_equal_the_target(runtime, tiny_target):  # noqa: ANN001
    ids = runtime.tokenize(PROMPT, add_bos=False)
    want_text, want_ids = _greedy_text(runtime, tiny_target, ids, 40)
    out = runtime.generate(ids, max_tokens=40, temperature=0, gamma=3)
    assert out.ids == want_ids and out.text == want_text
    assert out.prompt_tokens == len(ids) and out.stats.rounds.rounds > 0
    s = out.stats_dict()
    assert s["mode"] == "dssd" and s["gamma"] == 3 and s["tokens"] == len(want_ids)

    stream = runtime.stream(ids, max_tokens=40, temperature=0, gamma=3)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(p.text for p in pieces) == want_text
    assert [t for p in pieces for t in p.ids] == want_ids and stream.result.ids == want_ids

    async def go() -> tuple[str, str]:
        res = await runtime.agenerate(ids, max_tokens=40, temperature=0, mode="edge-only")
        parts = [p.text async for p in runtime.astream(ids, max_tokens=40, temperature=0)]
        return res.text, "".join(parts)

    assert asyncio.run(go()) == (want_text, want_text)


def test_library_chat_and_errors(runtime, tiny_target):  # noqa: ANN001
    msgs = [{"role": "user", "content": QUESTION}]
    want_text, _ = _greedy_text(runtime, tiny_target, _chat_ids(runtime, QUESTION), 24)
    assert runtime.generate(messages=msgs, max_tokens=24, temperature=0).text == want_text
    with pytest.raises(ContextLengthError):
        runtime.generate("word " * 600, max_tokens=4)
    with pytest.raises(ContextLengthError):
        runtime.generate(PROMPT, max_tokens=510)
    with pytest.raises(RequestError) as e:
        runtime.generate(PROMPT, temperature="hot")
    assert e.value.param == "temperature"
    with pytest.raises(RequestError):
        runtime.generate(PROMPT, mode="telepathy")
    # stopping a stream early frees the slot for the next request
    with runtime.stream(PROMPT, max_tokens=200, temperature=0) as s:
        next(iter(s))
    assert runtime.generate(PROMPT, max_tokens=3, temperature=0).completion_tokens <= 3


# -- the server through the official client ---------------------------------------------


def test_models_endpoint(client):  # noqa: ANN001
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_completion_greedy_equals_target(client, runtime, tiny_target):  # noqa: ANN001
    want_text, want_ids = _greedy_text(runtime, tiny_target, _chat_ids(runtime, QUESTION), 48)
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=48, temperature=0,
        extra_body={"gamma": 3, "mode": "dssd"},
    )
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want_text
    assert r.choices[0].finish_reason == ("length" if len(want_ids) == 48 and want_text else "stop")
    assert r.usage.completion_tokens == len(want_ids)
    assert r.usage.prompt_tokens == len(_chat_ids(runtime, QUESTION))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    d = r.model_extra["dssd"]
    assert d["mode"] == "dssd" and d["gamma"] == 3 and d["tokens"] == len(want_ids)
    rounds = d["rounds"]
    assert rounds["spec_decode_num_drafts"] > 0
    assert 0 <= rounds["spec_decode_num_accepted_tokens"] <= rounds["spec_decode_num_draft_tokens"]
    details = r.usage.completion_tokens_details
    assert details.accepted_prediction_tokens == rounds["spec_decode_num_accepted_tokens"]
    assert d["bytes_up"] > 0 and d["bytes_down"] > 0 and d["target_model"]


def test_completion_greedy_equals_target_all_modes(client, runtime, tiny_target):  # noqa: ANN001
    ids = runtime.tokenize(PROMPT)  # a string prompt gets BOS, as llama.cpp's server does
    want_text, want_ids = _greedy_text(runtime, tiny_target, ids, 32)
    for mode in ("dssd", "dssd-paper", "dsd", "edge-only"):
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0,
                                      extra_body={"mode": mode, "gamma": 4})
        assert r.object == "text_completion"
        assert r.choices[0].text == want_text, mode
        assert r.usage.completion_tokens == len(want_ids)
        assert r.model_extra["dssd"]["mode"] == mode
    # token-id prompts are accepted too
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=32, temperature=0)
    assert r.choices[0].text == want_text
    # completions default to 16 tokens, like OpenAI's
    r = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0)
    assert r.usage.completion_tokens <= 16


def test_streaming_chat_and_completion(client, runtime, tiny_target):  # noqa: ANN001
    want_chat, want_chat_ids = _greedy_text(runtime, tiny_target, _chat_ids(runtime, QUESTION), 40)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=40, temperature=0,
        stream=True, stream_options={"include_usage": True},
    ))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want_chat
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 1, "tokens must be streamed as they commit, not in one piece"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["dssd"]["tokens"] == len(want_chat_ids)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want_chat_ids)

    want, _ = _greedy_text(runtime, tiny_target, runtime.tokenize(PROMPT), 32)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_sampling_fields_and_stop(client):  # noqa: ANN001
    # a fixed gamma: the default, auto, follows measured timings, so the same seed gives
    # the same law but not the same sample (docs/adaptive.md)
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0.9, top_p=0.9, seed=123,
              extra_body={"top_k": 20, "gamma": 4})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text  # same seed, same sample
    assert a.model_extra["dssd"]["seed"] == 123 and a.model_extra["dssd"]["gamma"] == 4
    auto = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0.9,
                                     extra_body={"gamma": "auto"})
    assert auto.model_extra["dssd"]["gamma"] == "auto"
    default = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    assert default.model_extra["dssd"]["gamma"] == "auto"  # the library's and the CLI's default
    text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0).choices[0].text
    cut = text.strip().split(" ")[1] if len(text.strip().split(" ")) > 1 else None
    if cut:
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=[cut])
        assert r.choices[0].text == text[: text.find(cut)]
        assert r.choices[0].finish_reason == "stop" and r.model_extra["dssd"]["finish_reason"] == "stop"


def _two_concurrent_streams(base_url: str, runtime: DeviceRuntime, target) -> dict[str, list[tuple[float, int]]]:  # noqa: ANN001
    """A chat stream and a completion stream started together; both must equal the target."""
    prompts = {"chat": QUESTION, "completion": PROMPT}
    want = {
        "chat": _greedy_text(runtime, target, _chat_ids(runtime, QUESTION), 64)[0],
        "completion": _greedy_text(runtime, target, runtime.tokenize(PROMPT), 64)[0],
    }
    got: dict[str, list[tuple[float, str]]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(kind: str) -> None:
        try:
            c = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=120)
            barrier.wait()
            if kind == "chat":
                s = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompts[kind]}],
                                              max_tokens=64, temperature=0, stream=True)
                got[kind] = [(time.perf_counter(), ch.choices[0].delta.content or "") for ch in s if ch.choices]
            else:
                s = c.completions.create(model=MODEL, prompt=prompts[kind], max_tokens=64, temperature=0,
                                         stream=True)
                got[kind] = [(time.perf_counter(), ch.choices[0].text) for ch in s]
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a stream hung"
    assert not errors, errors
    for kind in prompts:
        assert "".join(p for _, p in got[kind]) == want[kind], kind
        assert len([p for _, p in got[kind] if p]) > 1
    return {k: [(t, len(p)) for t, p in v] for k, v in got.items()}


def test_two_concurrent_streams_complete_correctly(server, runtime, tiny_target):  # noqa: ANN001
    """One slot: the second request queues behind the first, then streams; neither is corrupted."""
    _two_concurrent_streams(server.base_url, runtime, tiny_target)


def test_two_concurrent_streams_on_two_slots(tiny_pair, tiny_edge, tiny_target):  # noqa: ANN001
    """Two slots (two drafters, two edge sessions): the streams run interleaved, both exact."""
    drafters = [LlamaDrafter(tiny_pair.draft_gguf, n_ctx=512, n_threads=1, f32_kv_cache=True) for _ in range(2)]
    rt = DeviceRuntime(edge_url=tiny_edge.url, drafters=drafters, model_name=MODEL)
    try:
        with OpenAIServerThread(rt) as srv:
            runs = [_two_concurrent_streams(srv.base_url, rt, tiny_target) for _ in range(2)]
        # served at once, not one after the other: the two streams' time spans overlap
        assert any(max(g["chat"][0][0], g["completion"][0][0]) < min(g["chat"][-1][0], g["completion"][-1][0])
                   for g in runs)
    finally:
        rt.close()
        for d in drafters:
            d.close()


def test_client_hanging_up_frees_the_slot(server, client, runtime):  # noqa: ANN001
    before = runtime.metrics()
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True,
                       "extra": 1}).encode()
    req = urllib.request.Request(server.base_url + "/completions", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    r = urllib.request.urlopen(req, timeout=60)
    assert r.readline().startswith(b"data: ")
    r.close()  # hang up mid-stream: the generation must be cancelled, not run to 400 tokens
    deadline = time.monotonic() + 30
    while runtime.metrics()["requests_cancelled"] == before["requests_cancelled"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = runtime.metrics()
    assert after["requests_cancelled"] == before["requests_cancelled"] + 1
    assert after["requests_ok"] == before["requests_ok"]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert out.usage.completion_tokens >= 1
    text = urllib.request.urlopen(server.base_url.removesuffix("/v1") + "/metrics", timeout=30).read().decode()
    assert 'dssd_requests_total{outcome="cancelled"}' in text and "dssd_spec_decode_num_drafts_total" in text


def test_bad_requests_get_openai_errors(client, server):  # noqa: ANN001
    url = server.base_url
    cases = [
        ("/chat/completions", "{not json", 400, None),
        ("/chat/completions", "[1, 2]", 400, None),
        ("/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, None),
        ("/chat/completions", json.dumps({"model": MODEL}), 400, "messages"),
        ("/chat/completions", json.dumps({"model": MODEL, "messages": "hi"}), 400, "messages"),
        ("/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user"}], "max_tokens": 2,
                                          "temperature": 0}), 200, None),
        ("/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": 5}]}), 400,
         "messages[0].content"),
        ("/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                          "temperature": "hot"}), 400, "temperature"),
        ("/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                          "max_tokens": True}), 400, "max_tokens"),
        ("/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                          "max_tokens": 10**30}), 400, "messages"),
        ("/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                          "stream": "yes"}), 400, "stream"),
        ("/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                          "gamma": 1000}), 400, "gamma"),
        ("/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                          "mode": "nope"}), 400, "mode"),
        ("/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                          "n": 17}), 400, "n"),
        ("/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                          "seed": -1}), 400, "seed"),
        ("/completions", json.dumps({"model": MODEL, "prompt": "word " * 2000}), 400, "prompt"),
        ("/completions", json.dumps({"model": MODEL, "prompt": [10**9]}), 400, "prompt"),
        ("/completions", json.dumps({"model": MODEL, "prompt": {"a": 1}}), 400, "prompt"),
        ("/completions", json.dumps({"model": MODEL, "prompt": "hi", "stop": [""]}), 400, "stop"),
        ("/completions", json.dumps({"model": MODEL, "prompt": "hi", "top_p": 0}), 400, "top_p"),
        ("/completions", json.dumps({"model": "gpt-4", "prompt": "hi"}), 404, "model"),
        ("/completions", json.dumps({"model": 7, "prompt": "hi"}), 400, "model"),
        ("/completions", "[" * 100000 + "]" * 100000, 400, None),
        ("/completions", b'{"prompt": "\xff\xfe\xfa"}', 400, None),
        ("/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x " * 3000}]}),
         400, "messages"),
        ("/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                          "presence_penalty": 1.5}), 400, "presence_penalty"),
        ("/nowhere", "{}", 404, None),
    ]
    for path, body, status, param in cases:
        code, resp = _post(url + path, body)
        assert code == status, (path, body[:80], code, resp)
        body = body if isinstance(body, str) else body.decode("latin-1")
        if status != 200:
            err = resp["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], resp
            if param is not None:
                assert err["param"] == param, (body[:80], err)
    # an over-long prompt while streaming is refused before any event is sent
    code, resp = _post(url + "/completions", json.dumps({"model": MODEL, "prompt": "word " * 2000,
                                                         "stream": True}))
    assert code == 400 and resp["error"]["code"] == "context_length_exceeded"
    # the body size cap
    code, resp = _post(url + "/completions", b'{"prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}')
    assert code == 413 and resp["error"]["code"] == "request_too_large"
    # the official client sees the right exception classes
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word " * 2000, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    # and the server still serves correctly afterwards
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0).usage.completion_tokens


def test_edge_down_is_503_and_recovers(tiny_pair, tiny_target):  # noqa: ANN001
    """Edge gone: 503 (streamed or not), device-only still works; edge back: served again."""
    drafter = LlamaDrafter(tiny_pair.draft_gguf, n_ctx=256, n_threads=1)
    edge = EdgeServerThread(tiny_target, ServerConfig(port=0)).__enter__()
    port = edge.server.config.port if edge.server.config.port else int(edge.url.rsplit(":", 1)[1])
    rt = DeviceRuntime(edge_url=edge.url, drafters=[drafter], model_name=MODEL)
    try:
        with OpenAIServerThread(rt) as srv:
            c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=60)
            kw = dict(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
            assert c.completions.create(**kw).usage.completion_tokens >= 1
            edge.__exit__(None, None, None)
            for stream in (False, True):
                with pytest.raises(openai.APIStatusError) as e:
                    list(c.completions.create(**kw, stream=True)) if stream else c.completions.create(**kw)
                assert e.value.status_code == 503 and e.value.code == "edge_unavailable"
            r = c.completions.create(**kw, extra_body={"mode": "device-only"})  # needs no edge
            assert r.usage.completion_tokens >= 1
            edge = EdgeServerThread(tiny_target, ServerConfig(port=port)).__enter__()
            assert c.completions.create(**kw).usage.completion_tokens >= 1
    finally:
        if edge.running:
            edge.__exit__(None, None, None)
        rt.close()
        drafter.close()


def test_serve_cli_help_and_old_cli_untouched():
    out = subprocess.run([sys.executable, "-m", "device_runtime", "serve", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--port" in out.stdout and "--edge" in out.stdout
    out = subprocess.run([sys.executable, "-m", "device_runtime", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--prompt" in out.stdout and "--chat" in out.stdout


def test_fuzzed_bodies_never_500(server):  # noqa: ANN001
    """Random wrong types and values in every field: always a JSON answer, never a 5xx."""
    import random

    rng = random.Random(0)
    values = [None, True, False, 0, -1, 1, 2, 3, 10**30, -(10**30), 0.5, 1e308, -0.0, 1e-300, "", "x", "dssd",
              "device-only", [], [""], ["a", "b"], [1, 2], [[1]], {}, {"type": "text"}, {"include_usage": "y"},
              [{"role": "user", "content": "hi"}], [{"role": 1}], "\u0000", "\ud7ff" * 3]
    fields = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
              "top_k", "seed", "stop", "stream", "stream_options", "n", "mode", "gamma", "downlink", "logprobs",
              "echo", "logit_bias", "response_format", "tools", "user", "suffix", "best_of", "presence_penalty",
              "top_logprobs", "tool_choice"]
    for i in range(160):
        chat = i % 2 == 0
        body: dict = ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]} if chat
                      else {"model": MODEL, "prompt": PROMPT})
        body["max_tokens"] = 3
        for f in rng.sample(fields, rng.randint(1, 3)):
            body[f] = rng.choice(values)
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 8:
            body["max_tokens"] = 8  # keep valid generations short
        if chat and isinstance(body.get("max_completion_tokens"), int) and body["max_completion_tokens"] > 8:
            body["max_completion_tokens"] = 8
        path = "/chat/completions" if chat else "/completions"
        req = urllib.request.Request(server.base_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        assert status < 500, (body, status, raw[:300])
        if status >= 400:
            assert set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}
        elif body.get("stream") is True:
            assert raw.rstrip().endswith(b"data: [DONE]") and b'"error"' not in raw, (body, raw[-300:])
        else:
            assert "choices" in json.loads(raw)


def test_blocking_calls_from_the_engine_thread_are_refused(runtime):  # noqa: ANN001
    """A blocking method called on the runtime's own loop would deadlock; it raises instead."""
    with pytest.raises(RuntimeError, match="own callbacks"):
        runtime._call(runtime._on_engine(lambda: runtime.tokenize(PROMPT)), timeout=30)
    assert runtime.tokenize(PROMPT)  # the engine is still usable
