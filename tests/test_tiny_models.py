"""The tiny GGUF fixtures are one model to llama.cpp and to transformers, with a usable draft.

Everything else in the suite that compares the device (llama.cpp) with the edge
(transformers) rests on these facts, so they are checked here directly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from device_runtime.llama_adapter import LlamaModel
from quantize.tiny import TinyPair, build_tiny_pair

PROMPTS = ("Hello world! The quick brown fox", "What is the capital of France?", "Once upon a time")
N_GREEDY = 32


def _llama(path: Path, *, logits_all: bool = False) -> llama_cpp.Llama:
    """Exact (f32 KV cache, no flash attention) single-thread llama.cpp context."""
    return LlamaModel.open(path, n_ctx=512, n_threads=1, n_batch=512, logits_all=logits_all, exact=True).llm


def _last_logits(llm: llama_cpp.Llama) -> np.ndarray:
    """Copy of the logits of the last evaluated token (the buffer is reused by the next decode)."""
    return LlamaModel(llm).last_logits().copy()


def _tokenize(llm: llama_cpp.Llama, text: str) -> list[int]:
    return llm.tokenize(text.encode(), add_bos=False, special=True)


def _greedy_llama(llm: llama_cpp.Llama, prompt: list[int], n: int, eos: int) -> list[int]:
    """Argmax decoding from the raw logits, stopping at eos like transformers does."""
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(n):
        tok = int(np.argmax(_last_logits(llm)))
        out.append(tok)
        if tok == eos:
            break
        llm.eval([tok])
    return out


@pytest.fixture(scope="module")
def target_llama(tiny_pair: TinyPair) -> Iterator[llama_cpp.Llama]:  # noqa: F811
    llm = _llama(tiny_pair.target_gguf)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def target_hf(tiny_pair: TinyPair) -> torch.nn.Module:  # noqa: F811
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_pair.directory), gguf_file=tiny_pair.target_gguf.name, dtype=torch.float32
    )
    return model.eval()


def test_build_time_and_files(tmp_path: Path, record_property: pytest.RecordProperty) -> None:
    start = time.perf_counter()
    pair = build_tiny_pair(tmp_path, seed=1)
    elapsed = time.perf_counter() - start
    record_property("build_seconds", elapsed)
    print(f"tiny pair build: {elapsed:.3f} s")
    for path in (pair.target_gguf, pair.draft_gguf, pair.other_vocab_gguf):
        assert path.stat().st_size > 0
    assert pair.target_gguf.read_bytes() != build_tiny_pair(tmp_path / "seed2", seed=2).target_gguf.read_bytes()


def test_tokenizers_agree(tiny_pair: TinyPair, target_llama: llama_cpp.Llama) -> None:  # noqa: F811
    hf_tok = AutoTokenizer.from_pretrained(str(tiny_pair.directory), gguf_file=tiny_pair.target_gguf.name)
    for text in ("Hello world", " Hello world!\nThe capital of France is Paris. 6789", "naïve ☃ test"):
        ids = _tokenize(target_llama, text)
        assert target_llama.detokenize(ids).decode() == text
        assert hf_tok.encode(text, add_special_tokens=False) == ids
        assert hf_tok.decode(ids) == text
    assert len(_tokenize(target_llama, "Hello world")) < len("Hello world")  # merges are used
    assert _tokenize(target_llama, "<|im_start|>user") == [1] + _tokenize(target_llama, "user")
    assert target_llama.token_eos() == tiny_pair.eos_token_id
    assert LlamaModel(target_llama).is_eog(tiny_pair.eos_token_id)
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_logits_match_batch_and_incremental(
    tiny_pair: TinyPair, target_llama: llama_cpp.Llama, target_hf: torch.nn.Module  # noqa: F811
) -> None:
    tokens = _tokenize(target_llama, "Hello world! The quick brown fox jumps over the lazy dog. Tell me a story")[:20]
    assert len(tokens) == 20
    with torch.no_grad():
        ref = target_hf(torch.tensor([tokens])).logits[0].numpy()

    batch = _llama(tiny_pair.target_gguf, logits_all=True)
    batch.eval(tokens)
    batch_diff = float(np.abs(np.asarray(batch.scores[: len(tokens)]) - ref).max())
    last_diff = float(np.abs(_last_logits(batch) - ref[-1]).max())
    batch.close()

    target_llama.reset()
    step_diff = 0.0
    for i, tok in enumerate(tokens):
        target_llama.eval([tok])
        step_diff = max(step_diff, float(np.abs(_last_logits(target_llama) - ref[i]).max()))
    print(f"max |logit diff| batch={batch_diff:.2e} last={last_diff:.2e} step={step_diff:.2e}")
    assert max(batch_diff, last_diff, step_diff) < 1e-4

    # Peaked, not uniform: the sampling tests need visible structure in the distribution.
    probs = torch.softmax(torch.from_numpy(ref), dim=-1).max(dim=-1).values
    print(f"top-token probability: median={probs.median():.2f} min={probs.min():.2f} max={probs.max():.2f}")
    assert 0.2 < float(probs.median()) < 0.95


def test_greedy_matches_transformers(target_llama: llama_cpp.Llama, target_hf: torch.nn.Module) -> None:
    eos = target_llama.token_eos()
    for text in PROMPTS:
        prompt = _tokenize(target_llama, text)
        ours = _greedy_llama(target_llama, prompt, N_GREEDY, eos)
        with torch.no_grad():
            out = target_hf.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=N_GREEDY, eos_token_id=eos, pad_token_id=0
            )
        assert out[0, len(prompt):].tolist() == ours
        assert len(set(ours)) > 3  # not a degenerate single-token loop


def test_draft_differs_from_target(tiny_pair: TinyPair, target_llama: llama_cpp.Llama) -> None:  # noqa: F811
    """Greedy agreement on the target's own greedy continuations (the speculative regime)."""
    eos = target_llama.token_eos()
    draft = _llama(tiny_pair.draft_gguf, logits_all=True)
    target = _llama(tiny_pair.target_gguf, logits_all=True)
    agree, total = 0, 0
    for text in PROMPTS:
        prompt = _tokenize(target_llama, text)
        seq = prompt + _greedy_llama(target_llama, prompt, 64, eos)
        argmaxes = []
        for llm in (draft, target):
            llm.reset()
            llm.eval(seq)
            argmaxes.append(np.asarray(llm.scores[len(prompt) - 1 : len(seq) - 1]).argmax(axis=-1))
        agree += int((argmaxes[0] == argmaxes[1]).sum())
        total += len(argmaxes[0])
    draft.close()
    target.close()
    rate = agree / total
    print(f"draft/target greedy agreement: {rate:.2f} over {total} positions")
    assert 0.3 < rate < 0.95


def test_other_vocab_differs(tiny_pair: TinyPair) -> None:  # noqa: F811
    def tokens(path: Path) -> list[str]:
        field = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"]
        return [bytes(field.parts[i]).decode() for i in field.data]

    ours, other = tokens(tiny_pair.target_gguf), tokens(tiny_pair.other_vocab_gguf)
    assert tokens(tiny_pair.draft_gguf) == ours
    assert len(other) == len(ours) == tiny_pair.n_vocab
    assert other != ours and set(other) != set(ours)
    llm = _llama(tiny_pair.other_vocab_gguf)  # still loadable
    assert llm.n_vocab() == tiny_pair.n_vocab
    llm.close()
