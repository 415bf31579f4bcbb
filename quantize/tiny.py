"""Tiny random llama-architecture GGUF models that llama.cpp and transformers both load.

Tests that draw many samples or compare the two runtimes number for number cannot use the
real 135M model (too slow, and quantized). These fixtures write, in well under a second,
f32 GGUF files with:

* a byte-level BPE tokenizer ("gpt2" model, "gpt-2" pre-tokenizer) trained on a built-in
  corpus, ChatML special tokens and a ChatML chat template;
* random weights generated directly in GGUF layout (transformers undoes llama.cpp's q/k
  row permutation on load, so both runtimes compute the same function);
* peaked next-token distributions, so sampling tests have signal;
* a draft = target + relative Gaussian noise, so draft/target greedy agreement is partial;
* a third file whose token list differs in its last few entries, for mismatch tests.

Why a packaged module and not a test fixture: `python -m benchmarks quick` builds the
same pair to run without the real models, so it must import from an installed package;
`tests/fixtures/tiny_models.py` wraps it as a pytest fixture.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ids 1/2 are also LlamaConfig's default bos/eos, which transformers keeps for GGUF llama files.
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = (
    "Hello world! The small model drafts tokens on the device and the large model on the edge "
    "verifies them. When the draft is right, the edge accepts the tokens and the user gets the "
    "answer sooner. When the draft is wrong, the edge rejects the token, samples a new one from "
    "the residual distribution, and the device rolls back its cache. The quick brown fox jumps "
    "over the lazy dog. Speculative decoding keeps the output distribution of the target model "
    "exactly, while the number of round trips between the device and the edge goes down. "
    "This is a test of the tokenizer: numbers like 12, 345 and 6789 should also work, as should "
    "questions? and answers. What is the capital of France? The capital of France is Paris. "
    "Tell me a story about a robot that learns to speak. Once upon a time there was a robot "
    "that wanted to talk with the people in the town, so it listened and learned every day. "
)
# Same split as the GPT-2 regex on ASCII text; only used to train merges.
_PRETOKENIZE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")
# How many final merges the "other vocabulary" replaces.
_OTHER_VOCAB_CHANGED = 8


@dataclass(frozen=True)
class TinyConfig:
    """Model shape; small enough that a forward pass costs well under a millisecond."""

    hidden: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn: int = 192
    context_length: int = 512
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads


@dataclass(frozen=True)
class TinyPair:
    """Paths of one built model family plus the facts tests need about its vocabulary."""

    directory: Path
    target_gguf: Path
    draft_gguf: Path
    other_vocab_gguf: Path
    n_vocab: int
    eos_token_id: int


@dataclass(frozen=True)
class _Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE token strings use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _train_merges(n_merges: int, exclude: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """Deterministic BPE training on the corpus; merges whose result is in `exclude` are skipped."""
    byte_map = _bytes_to_unicode()
    words: Counter[tuple[str, ...]] = Counter(
        tuple(byte_map[b] for b in piece.encode("utf-8")) for piece in _PRETOKENIZE.findall(CORPUS)
    )
    known = set(byte_map.values())
    skipped: set[tuple[str, str]] = set()
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                if pair not in skipped:
                    pairs[pair] += count
        if not pairs:
            raise ValueError(f"corpus yields only {len(merges)} merges, {n_merges} requested")
        best = min(pairs.items(), key=lambda item: (-item[1], item[0]))[0]
        merged = best[0] + best[1]
        if merged in known or merged in exclude:
            skipped.add(best)  # keep every token string unique, and honour the exclusion
            continue
        known.add(merged)
        merges.append(best)
        new_words: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    return merges


def _build_vocab(n_vocab: int, exclude: frozenset[str] = frozenset()) -> _Vocab:
    """Special tokens, then the 256 byte tokens, then one token per merge."""
    n_merges = n_vocab - len(SPECIAL_TOKENS) - 256
    if n_merges < 0:
        raise ValueError(f"n_vocab must be at least {len(SPECIAL_TOKENS) + 256}")
    merges = _train_merges(n_merges, exclude)
    tokens = list(SPECIAL_TOKENS) + [_bytes_to_unicode()[b] for b in range(256)] + [a + b for a, b in merges]
    n_special = len(SPECIAL_TOKENS)
    types = [int(gguf.TokenType.CONTROL)] * n_special + [int(gguf.TokenType.NORMAL)] * (n_vocab - n_special)
    return _Vocab(tokens=tokens, types=types, merges=[f"{a} {b}" for a, b in merges])


def _random_weights(
    cfg: TinyConfig, n_vocab: int, rng: np.random.Generator, logit_scale: float
) -> dict[str, np.ndarray]:
    """Random weights in GGUF layout (numpy shape = (out, in)), scaled for peaked logits.

    Inputs to each matmul are RMS-normalised, so an N(0, s^2/fan_in) matrix gives outputs of
    standard deviation about s; `logit_scale` is therefore the logit standard deviation.
    """

    def mat(rows: int, cols: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(cfg.hidden)).astype(np.float32)

    hd = cfg.head_dim
    w: dict[str, np.ndarray] = {"token_embd.weight": rng.standard_normal((n_vocab, cfg.hidden)).astype(np.float32)}
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = norm()
        w[p + "attn_q.weight"] = mat(cfg.n_heads * hd, cfg.hidden, 2.0)  # sharper attention patterns
        w[p + "attn_k.weight"] = mat(cfg.n_kv_heads * hd, cfg.hidden, 2.0)
        w[p + "attn_v.weight"] = mat(cfg.n_kv_heads * hd, cfg.hidden)
        w[p + "attn_output.weight"] = mat(cfg.hidden, cfg.n_heads * hd)
        w[p + "ffn_norm.weight"] = norm()
        w[p + "ffn_gate.weight"] = mat(cfg.ffn, cfg.hidden)
        w[p + "ffn_up.weight"] = mat(cfg.ffn, cfg.hidden)
        w[p + "ffn_down.weight"] = mat(cfg.hidden, cfg.ffn)
    w["output_norm.weight"] = norm()
    w["output.weight"] = mat(n_vocab, cfg.hidden, logit_scale)
    return w


def _perturb(weights: dict[str, np.ndarray], noise: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Add Gaussian noise of `noise` times each tensor's spread (norm weights: 0.1, their spread around 1).

    Random nets are chaotic: greedy agreement is about 0.75 at 0.03, 0.7 at 0.04, 0.45 at 0.1, 0.25 at 0.2.
    """
    out: dict[str, np.ndarray] = {}
    for name, t in weights.items():
        scale = 0.1 if t.ndim == 1 else float(t.std())
        out[name] = (t + noise * scale * rng.standard_normal(t.shape)).astype(np.float32)
    return out


def _write_gguf(path: Path, cfg: TinyConfig, vocab: _Vocab, weights: dict[str, np.ndarray], name: str) -> None:
    """Write one f32 llama GGUF with the metadata both llama.cpp and transformers read."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    writer.add_vocab_size(len(vocab.tokens))
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.hidden)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp's GPT-2 regex = transformers' ByteLevel regex
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(BOS_TOKEN_ID)
    writer.add_eos_token_id(EOS_TOKEN_ID)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)  # else transformers' decoder strips a leading space
    writer.add_chat_template(CHATML_TEMPLATE)
    for tensor_name, tensor in weights.items():
        writer.add_tensor(tensor_name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def build_tiny_pair(
    directory: Path,
    *,
    seed: int = 0,
    n_vocab: int = 384,
    draft_noise: float = 0.04,
    logit_scale: float = 4.0,
    config: TinyConfig = TinyConfig(),
) -> TinyPair:
    """Write target.gguf, draft.gguf and other_vocab.gguf into `directory` and describe them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = _build_vocab(n_vocab)
    other_vocab = _build_vocab(n_vocab, exclude=frozenset(vocab.tokens[-_OTHER_VOCAB_CHANGED:]))
    target = _random_weights(config, n_vocab, rng, logit_scale)
    draft = _perturb(target, draft_noise, rng)
    pair = TinyPair(
        directory=directory,
        target_gguf=directory / "target.gguf",
        draft_gguf=directory / "draft.gguf",
        other_vocab_gguf=directory / "other_vocab.gguf",
        n_vocab=n_vocab,
        eos_token_id=EOS_TOKEN_ID,
    )
    _write_gguf(pair.target_gguf, config, vocab, target, "tiny-target")
    _write_gguf(pair.draft_gguf, config, vocab, draft, "tiny-draft")
    _write_gguf(pair.other_vocab_gguf, config, other_vocab, draft, "tiny-other-vocab")
    return pair
