"""DSSD end to end: real llama.cpp device, real transformers edge, real WebSocket on loopback.

Greedy output of every edge mode must equal transformers' own `generate` on the target,
token for token; sampled output must follow the target's distribution.
"""
from __future__ import annotations

import asyncio
import logging

import llama_cpp
import numpy as np
import pytest
import torch
from scipy import stats

from device_runtime.llama_adapter import LlamaModel
from device_runtime.drafter import LlamaDrafter
from device_runtime.session import DeviceClient, GenerationConfig, GenerationResult
from device_runtime.transport import EdgeError
from protocol.modes import EDGE_MODES
from protocol.sampling import SamplingParams, probabilities
from protocol.wire import ErrorCode

GREEDY = SamplingParams(0.0)
TINY_PROMPTS = ("Hello world", "The cat sat on the", "<|im_start|>user\nWhy is the sky blue?")


def reference_greedy(target, prompt_ids: list[int], n: int) -> list[int]:  # noqa: ANN001
    """transformers' own greedy decoding on the target: the independent reference."""
    model = target.model
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            pad_token_id=model.generation_config.eos_token_id,
        )
    return out[0, len(prompt_ids) :].tolist()


def run(client: DeviceClient, requests: list[tuple[list[int], GenerationConfig]]) -> list[GenerationResult]:
    """Run requests in order on one connection (one event loop), then close it."""

    async def go() -> list[GenerationResult]:
        try:
            return [await client.generate(ids, cfg) for ids, cfg in requests]
        finally:
            await client.close()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def tiny_drafter(tiny_pair) -> LlamaDrafter:  # noqa: ANN001
    drafter = LlamaDrafter(tiny_pair.draft_gguf, n_ctx=512, n_threads=1, f32_kv_cache=True)
    yield drafter
    drafter.close()


def _client(drafter: LlamaDrafter, url: str | None) -> DeviceClient:
    return DeviceClient(drafter, url, client_name="pytest")


@pytest.mark.parametrize("mode", EDGE_MODES)
def test_tiny_greedy_equals_transformers_generate(mode, tiny_pair, tiny_target, tiny_edge, tiny_drafter):  # noqa: ANN001
    for prompt in TINY_PROMPTS:
        ids = tiny_drafter.tokenize(prompt, add_bos=False)
        want = reference_greedy(tiny_target, ids, 64)
        configs = [GenerationConfig(mode=mode, max_new_tokens=64, sampling=GREEDY, gamma=g) for g in (1, 4)]
        for got in run(_client(tiny_drafter, tiny_edge.url), [(ids, c) for c in configs]):
            assert got.ids == want, (mode, prompt)
            if mode != "edge-only":
                assert got.stats.rounds.rounds > 0
                assert 0 < got.stats.rounds.accepted_tokens < got.stats.rounds.draft_tokens


def test_tiny_device_only_equals_llama_cpp_greedy(tiny_pair, tiny_drafter):  # noqa: ANN001
    ref = llama_cpp.Llama(model_path=str(tiny_pair.draft_gguf), n_ctx=512, n_threads=1,
                          type_k=0, type_v=0, flash_attn=False, verbose=False)
    for prompt in TINY_PROMPTS:
        ids = tiny_drafter.tokenize(prompt, add_bos=False)
        want = []
        for tok in ref.generate(ids, top_k=1, temp=0.0, reset=True):
            want.append(tok)
            if LlamaModel(ref).is_eog(tok) or len(want) == 48:
                break
        cfg = GenerationConfig(mode="device-only", max_new_tokens=48, sampling=GREEDY)
        assert run(_client(tiny_drafter, None), [(ids, cfg)])[0].ids == want
    ref.close()


def test_vocabulary_mismatch_is_refused(tiny_pair, tiny_edge, caplog):  # noqa: ANN001
    caplog.set_level(logging.INFO, logger="edge_service")
    other = LlamaDrafter(tiny_pair.other_vocab_gguf, n_ctx=128, n_threads=1)
    client = _client(other, tiny_edge.url)
    with pytest.raises(EdgeError) as err:
        run(client, [([5, 6, 7], GenerationConfig(sampling=GREEDY))])
    assert err.value.code == ErrorCode.VOCAB_MISMATCH
    assert "vocabulary mismatch" in str(err.value)
    assert any("vocabulary mismatch" in r.getMessage() for r in caplog.records)
    other.close()


def _exact_first_two(target, prompt_ids: list[int], params: SamplingParams) -> dict[tuple[int, int], float]:  # noqa: ANN001
    """The target's exact law of the first two sampled tokens, from its logits."""
    seq = target.new_sequence()
    p1 = probabilities(seq.forward(prompt_ids)[-1], params).astype(np.float64)
    law = {}
    for a in np.flatnonzero(p1):
        seq.rollback(len(prompt_ids))
        p2 = probabilities(seq.forward([int(a)])[-1], params).astype(np.float64)
        for b in np.flatnonzero(p2):
            law[(int(a), int(b))] = p1[a] * p2[b]
    seq.release()
    return law


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "downlink"), [("dssd", "auto"), ("dssd", "candidates"), ("dsd", "auto")])
def test_tiny_sampled_first_tokens_follow_the_target(mode, downlink, tiny_pair, tiny_target, tiny_edge, tiny_drafter):  # noqa: ANN001
    """Many short sampled generations: (y1, y2) must follow the target's exact joint law."""
    params = SamplingParams(1.0, top_k=4)
    ids = tiny_drafter.tokenize("The cat sat on the", add_bos=False)
    law = _exact_first_two(tiny_target, ids, params)
    client = _client(tiny_drafter, tiny_edge.url)
    n = 3000
    counts: dict[tuple[int, int], int] = {}

    async def many() -> None:
        for seed in range(n):
            cfg = GenerationConfig(mode=mode, max_new_tokens=2, sampling=params, gamma=3, seed=seed,
                                   downlink=downlink)
            res = await client.generate(ids, cfg)
            key = (res.ids[0], res.ids[1])
            counts[key] = counts.get(key, 0) + 1
        await client.close()

    asyncio.run(many())
    assert set(counts) <= set(law), "a pair outside the target's support was emitted"
    keys = sorted(law)
    observed = np.array([counts.get(k, 0) for k in keys])
    expected = np.array([law[k] for k in keys]) * n / sum(law.values())
    assert stats.chisquare(observed, expected).pvalue > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("mode", EDGE_MODES)
def test_default_pair_greedy_equals_transformers_generate(mode, default_pair, default_target, default_edge):  # noqa: ANN001
    drafter = LlamaDrafter(default_pair.draft_q4_0_gguf, n_ctx=1024, n_threads=1)
    prompts = [
        drafter.tokenize(drafter.chat_prompt([{"role": "user", "content": q}]), add_bos=False)
        for q in ("What is the capital of France?", "Write a haiku about the sea.")
    ] + [drafter.tokenize("The three primary colors are")]
    cfg = GenerationConfig(mode=mode, max_new_tokens=64, sampling=GREEDY, gamma=4)
    results = run(_client(drafter, default_edge.url), [(ids, cfg) for ids in prompts])
    for ids, got in zip(prompts, results):
        assert got.ids == reference_greedy(default_target, ids, 64)
    drafter.close()
