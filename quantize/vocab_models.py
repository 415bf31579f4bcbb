"""Real tokenizers without real weights: the vocab-only GGUFs of llama.cpp, as model pairs.

Why: the families people deploy (Qwen2, Llama-3) differ from the default SmolLM2 pair in
what breaks pairing -- Qwen2 pads its 151,646-token vocabulary to 151,936 logits rows,
Llama-3 has 128,256 tokens, BOS added and a different pre-tokenizer -- and their real
weights are gigabytes. llama.cpp ships the real vocabularies as vocab-only GGUFs (no
tensors) in the llama-cpp-python sdist. From one of them this module builds:

* an HF-directory target: a ``tokenizer.json`` made from the GGUF's tokens and merges
  (padding left out: ``len(tokenizer)`` is the real token count, as with the real HF
  tokenizer) and random weights of the real architecture, tiny except for the
  vocabulary-sized embedding (hidden size 16);
* a GGUF draft converted from a perturbed copy of those weights by our own
  :func:`quantize.hf_to_gguf.convert_hf_to_gguf`, which pads the token list back to the
  row count with ``[PAD<id>]`` entries, as llama.cpp's converter does.

The weights are scaled so that next-token distributions are peaked (logit spread of a
few units): greedy decisions are then far from float-rounding ties, and the draft agrees
with the target only part of the time.

`fetch_vocabs` gets the GGUFs at setup time (``python -m quantize fetch-vocabs``, part
of ``make setup``): ``pip download`` of the pinned sdist into a cache, two files out.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dssd_common.gguf_header import scan_gguf
from dssd_common.models import resolve_models_dir
from protocol.vocab import real_token_count

from .errors import ToolError
from .tokenizer_meta import hf_pre_tokenizer

logger = logging.getLogger(__name__)

#: The sdist that ships the vocab-only GGUFs (the version requirements.txt pins).
SDIST_REQUIREMENT = "llama-cpp-python==0.3.36"
SDIST_NAME = "llama_cpp_python-0.3.36.tar.gz"
SDIST_MODELS = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/"
#: Family name -> vocab-only GGUF in the sdist.
VOCAB_FILES: dict[str, str] = {"qwen2": "ggml-vocab-qwen2.gguf", "llama3": "ggml-vocab-llama-bpe.gguf"}
#: Where `fetch_vocabs` puts them, under the models directory.
VOCABS_SUBDIR = "vocabs"


class VocabFetchError(ToolError):
    """The vocab-only GGUFs could not be fetched or extracted."""


def vocabs_dir(models_dir: str | Path | None = None) -> Path:
    return resolve_models_dir(models_dir) / VOCABS_SUBDIR


def vocab_paths(models_dir: str | Path | None = None) -> dict[str, Path]:
    """Family -> path of its vocab-only GGUF (it may not exist yet)."""
    root = vocabs_dir(models_dir)
    return {family: root / name for family, name in VOCAB_FILES.items()}


def fetch_vocabs(models_dir: str | Path | None = None) -> dict[str, Path]:
    """Make sure the vocab-only GGUFs are in ``<models>/vocabs``; idempotent.

    Downloads the sdist with pip (from whatever index pip is configured for) only when
    a file is missing and no sdist is cached there yet.
    """
    paths = vocab_paths(models_dir)
    if all(p.is_file() for p in paths.values()):
        return paths
    root = vocabs_dir(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / SDIST_NAME
    if not sdist.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
               SDIST_REQUIREMENT, "-d", str(root)]
        logger.info("downloading the %s sdist for its vocab-only GGUFs: %s", SDIST_REQUIREMENT, " ".join(cmd))
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0 or not sdist.is_file():
            raise VocabFetchError(f"pip download of {SDIST_REQUIREMENT} failed:\n{done.stdout[-2000:]}")
    try:
        with tarfile.open(sdist) as tar:
            for family, path in paths.items():
                # the GGUF, and llama.cpp's tokenizer test texts (.inp) with their expected ids (.out)
                for suffix in (".inp", ".out", ""):
                    name = VOCAB_FILES[family] + suffix
                    source = tar.extractfile(tar.getmember(SDIST_MODELS + name))
                    if source is None:
                        raise VocabFetchError(f"{name} in {sdist} is not a file")
                    tmp = root / (name + ".part")
                    with source, open(tmp, "wb") as out:
                        shutil.copyfileobj(source, out)
                    tmp.replace(root / name)  # the GGUF last: its presence means all are there
    except (tarfile.TarError, KeyError, OSError) as exc:
        raise VocabFetchError(f"cannot extract the vocab GGUFs from {sdist}: {exc}") from exc
    sdist.unlink()  # 77 MB for 14 MB of vocabularies: fetched again only if one goes missing
    logger.info("vocab-only GGUFs in %s", root)
    return paths


# --------------------------------------------------------------------------- the vocabulary


@dataclass(frozen=True)
class GGUFTokenizer:
    """The tokenizer keys of a vocab-only GGUF."""

    family: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int | None
    chat_template: str | None
    n_real: int  # tokens without the trailing [PAD<id>] rows

    @property
    def adds_bos(self) -> bool:
        """llama.cpp adds BOS for the Llama-3 pre-tokenizer (the GGUF has no key for it)."""
        return self.pre == "llama-bpe"


def read_gguf_tokenizer(path: Path) -> GGUFTokenizer:
    """The tokenizer keys, with the fast header scanner (gguf.GGUFReader takes ~30 s on 280k merges)."""
    keys = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"})
    meta = scan_gguf(path, keys).metadata
    tokens = meta.get("tokenizer.ggml.tokens")
    if meta.get("tokenizer.ggml.model") != "gpt2" or not isinstance(tokens, list):
        raise ToolError(f"{path}: only byte-level BPE (gpt2) vocabularies are supported here")
    merges = meta.get("tokenizer.ggml.merges")
    return GGUFTokenizer(
        family=str(meta.get("general.architecture")), tokens=tokens, types=list(meta["tokenizer.ggml.token_type"]),
        merges=merges if isinstance(merges, list) else [], pre=str(meta.get("tokenizer.ggml.pre")),
        bos_id=meta.get("tokenizer.ggml.bos_token_id"), eos_id=meta.get("tokenizer.ggml.eos_token_id"),
        chat_template=meta.get("tokenizer.chat_template"), n_real=real_token_count(tokens),
    )


def write_hf_tokenizer(tok: GGUFTokenizer, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json of the real tokens (padding rows left out)."""
    import gguf

    pre = hf_pre_tokenizer(tok.pre)
    if pre is None:
        raise ToolError(f"pre-tokenizer {tok.pre!r} has no tokenizer.json equivalent here")
    special = {int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)}
    added = [
        {"id": i, "content": tok.tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": tok.types[i] == int(gguf.TokenType.CONTROL)}
        for i in range(tok.n_real) if tok.types[i] in special
    ]
    added_ids = {a["id"] for a in added}
    vocab = {tok.tokens[i]: i for i in range(tok.n_real) if i not in added_ids}
    bos = tok.tokens[tok.bos_id] if tok.bos_id is not None else None
    post: dict[str, Any] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    if tok.adds_bos and bos is not None:
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}}}
    data = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": pre, "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": tok.pre == "llama-bpe",  # llama.cpp's llama3 pre-tokenizer does
                  "vocab": vocab, "merges": [m.split(" ", 1) for m in tok.merges]},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
        "model_max_length": 131072, "add_bos_token": tok.adds_bos, "add_eos_token": False,
        "bos_token": bos, "eos_token": tok.tokens[tok.eos_id] if tok.eos_id is not None else None,
    }
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1), encoding="utf-8")


# --------------------------------------------------------------------------- the models


@dataclass(frozen=True)
class VocabPairSpec:
    """Shape of a random-weight pair: tiny everywhere except the vocabulary."""

    hidden: int = 16
    n_layers: int = 1
    n_heads: int = 2
    n_kv_heads: int = 1
    ffn: int = 32
    context: int = 2048
    target_rows: int | None = None  # None: the GGUF's row count
    draft_rows: int | None = None  # None: the target's
    draft_noise: float = 0.05
    seed: int = 0


@dataclass(frozen=True)
class VocabPair:
    """An HF-directory target and a GGUF draft with a real tokenizer."""

    family: str
    target_dir: Path
    draft_gguf: Path
    n_tokens: int  # real tokens (len of the HF tokenizer)
    target_rows: int
    draft_rows: int


def _hf_config(tok: GGUFTokenizer, spec: VocabPairSpec, rows: int) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=rows, hidden_size=spec.hidden, intermediate_size=spec.ffn,
                  num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
                  num_key_value_heads=spec.n_kv_heads, max_position_embeddings=spec.context,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    if tok.family == "qwen2":
        return Qwen2Config(rope_theta=1_000_000.0, architectures=["Qwen2ForCausalLM"], **common)
    if tok.family == "llama":
        return LlamaConfig(rope_theta=500_000.0, architectures=["LlamaForCausalLM"], **common)
    raise ToolError(f"no random-weight architecture for the {tok.family!r} vocabulary")


def _new_model(tok: GGUFTokenizer, spec: VocabPairSpec, rows: int) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)  # every parameter is overwritten; the buffers (rope) are computed
    model = AutoModelForCausalLM.from_config(_hf_config(tok, spec, rows), dtype=torch.float32)
    model.generation_config.eos_token_id = tok.eos_id
    model.generation_config.bos_token_id = tok.bos_id
    return model


def _random_values(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Peaked outputs: unit embeddings (tied to the lm_head: logits spread ~sqrt(hidden)),
    2/sqrt(fan_in) matrices (sharp attention), norms near 1, small biases."""
    if len(shape) == 2 and "embed_tokens" in name:
        return rng.standard_normal(shape)
    if len(shape) == 2:
        return rng.standard_normal(shape) * (2.0 / np.sqrt(shape[1]))
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * rng.standard_normal(shape)
    return 0.1 * rng.standard_normal(shape)


def _fill(model: Any, values: dict[str, np.ndarray]) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():  # tied: the lm_head is the embedding
            p.copy_(torch.from_numpy(values[name].astype(np.float32)))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_vocab_pair(vocab_gguf: str | Path, out_dir: str | Path, spec: VocabPairSpec = VocabPairSpec()) -> VocabPair:
    """Write ``target/`` (HF directory) and ``draft.gguf`` into `out_dir` from a vocab GGUF."""
    from .hf_to_gguf import convert_hf_to_gguf

    tok = read_gguf_tokenizer(Path(vocab_gguf))
    out = Path(out_dir)
    target_rows = spec.target_rows or len(tok.tokens)
    draft_rows = spec.draft_rows or target_rows
    if min(target_rows, draft_rows) < tok.n_real:
        raise ToolError(f"{tok.n_real} real tokens need at least as many rows")
    rng = np.random.default_rng(spec.seed)
    target = _new_model(tok, spec, target_rows)
    values = {name: _random_values(name, tuple(p.shape), rng) for name, p in target.named_parameters()}
    _fill(target, values)
    target_dir = out / "target"
    target.save_pretrained(target_dir)
    write_hf_tokenizer(tok, target_dir)
    draft = _new_model(tok, spec, draft_rows)
    noisy: dict[str, np.ndarray] = {}
    for name, p in draft.named_parameters():
        base = values[name]
        if base.shape != tuple(p.shape):  # the embedding of another padded row count
            base = np.concatenate([base, rng.standard_normal((p.shape[0] - base.shape[0], *base.shape[1:]))]) \
                if p.shape[0] > base.shape[0] else base[: p.shape[0]]
        spread = float(base.std()) if base.ndim > 1 else 0.1
        noisy[name] = base + spec.draft_noise * spread * rng.standard_normal(base.shape)
    _fill(draft, noisy)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        draft.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            shutil.copyfile(target_dir / name, Path(tmp) / name)
        convert_hf_to_gguf(tmp, out / "draft.gguf", "f32", progress=False)
    return VocabPair(tok.family, target_dir, out / "draft.gguf", tok.n_real, target_rows, draft_rows)
