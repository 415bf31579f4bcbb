"""Tokenizer metadata between a Hugging Face tokenizer directory and a GGUF file.

Why this is its own module: the device (llama.cpp) tokenizes every prompt, so a GGUF
written by ``hf-to-gguf`` is only usable if llama.cpp splits text exactly as the HF
tokenizer does. Two things must carry over:

* the vocabulary: token strings in id order, token types, BPE merges (byte-level BPE,
  ``tokenizer.ggml.model = "gpt2"``) or SentencePiece scores (``"llama"``);
* the pre-tokenizer: llama.cpp does not read the regex from the file, it picks one of
  its built-in splitters by name (``tokenizer.ggml.pre``). :data:`PRE_TOKENIZERS` maps
  those names to the ``tokenizer.json`` pre-tokenizer they implement, in both
  directions: :func:`detect_pre_tokenizer` for HF -> GGUF, and
  :func:`hf_pre_tokenizer` for GGUF -> HF (transformers' own GGUF tokenizer loader drops
  e.g. SmolLM's digit splitting, which ``edge-export`` puts back).

Unknown pre-tokenizers are refused rather than guessed: a wrong splitter tokenizes
most text identically and silently corrupts the rest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from .errors import ToolError

logger = logging.getLogger(__name__)


class TokenizerError(ToolError):
    """The tokenizer cannot be represented in GGUF metadata (or not safely)."""

_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split_then_bytes(regex: str) -> dict[str, Any]:
    return {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            _byte_level(False),
        ],
    }


#: llama.cpp pre-tokenizer name -> the ``tokenizer.json`` pre_tokenizer it reproduces.
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "gpt-2": _byte_level(True),
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, _byte_level(True)],
    },
    "llama-bpe": _split_then_bytes(_LLAMA3_REGEX),
    "qwen2": _split_then_bytes(_QWEN2_REGEX),
}


def _canonical(node: Any) -> Any:
    """Drop fields that do not change how text is split (offset trimming only affects spans)."""
    if isinstance(node, dict):
        return {k: _canonical(v) for k, v in node.items() if k != "trim_offsets"}
    if isinstance(node, list):
        return [_canonical(v) for v in node]
    return node


def detect_pre_tokenizer(pre_tokenizer: Any) -> str | None:
    """The llama.cpp pre-tokenizer name equivalent to a ``tokenizer.json`` pre_tokenizer, or None."""
    wanted = _canonical(pre_tokenizer)
    for name, spec in PRE_TOKENIZERS.items():
        if _canonical(spec) == wanted:
            return name
    return None


def hf_pre_tokenizer(pre_name: str) -> dict[str, Any] | None:
    """The ``tokenizer.json`` pre_tokenizer for a llama.cpp pre-tokenizer name (None if unknown)."""
    spec = PRE_TOKENIZERS.get(pre_name)
    return None if spec is None else json.loads(json.dumps(spec))


@dataclass(frozen=True)
class GGUFVocab:
    """Everything the ``tokenizer.*`` keys of a GGUF hold, read from an HF tokenizer."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_space_prefix: bool
    chat_template: str | None

    def write(self, writer: gguf.GGUFWriter) -> None:
        """Add the tokenizer keys to a GGUF writer (before its header is written)."""
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        for token_id, add in (
            (self.bos_id, writer.add_bos_token_id),
            (self.eos_id, writer.add_eos_token_id),
            (self.unk_id, writer.add_unk_token_id),
            (self.pad_id, writer.add_pad_token_id),
        ):
            if token_id is not None:
                add(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def read_hf_vocab(
    hf_dir: Path,
    *,
    vocab_size: int,
    special_ids: dict[str, int | None],
    pre_override: str | None = None,
) -> GGUFVocab:
    """Read the tokenizer of an HF directory as GGUF vocabulary metadata.

    ``vocab_size`` is the model's embedding row count: a tokenizer with fewer entries
    is padded with unused ``[PAD<i>]`` tokens (as llama.cpp's converter does), because
    llama.cpp requires one token per logits row. ``special_ids`` (bos/eos/unk/pad from
    the model config) win over the tokenizer config, which may name other tokens.
    """
    tokenizer_json = hf_dir / "tokenizer.json"
    spm_model = hf_dir / "tokenizer.model"
    config = _read_json(hf_dir / "tokenizer_config.json") if (hf_dir / "tokenizer_config.json").is_file() else {}
    if tokenizer_json.is_file():
        data = _read_json(tokenizer_json)
        model_type = data.get("model", {}).get("type")
        if model_type == "BPE" and not data["model"].get("byte_fallback", False):
            vocab = _read_byte_level_bpe(data, config, vocab_size, pre_override)
        elif spm_model.is_file():
            vocab = _read_sentencepiece(spm_model, data, config, vocab_size)
        else:
            raise TokenizerError(
                f"{tokenizer_json}: tokenizer model {model_type!r} is not supported "
                "(byte-level BPE via tokenizer.json, or SentencePiece via tokenizer.model)"
            )
    elif spm_model.is_file():
        vocab = _read_sentencepiece(spm_model, None, config, vocab_size)
    else:
        raise TokenizerError(f"{hf_dir} has no tokenizer.json or tokenizer.model; the GGUF needs the tokenizer")

    ids = {**_special_ids_from_config(config, vocab.tokens), **{k: v for k, v in special_ids.items() if v is not None}}
    template = _chat_template(hf_dir, config)
    return dataclasses.replace(
        vocab, bos_id=ids.get("bos"), eos_id=ids.get("eos"), unk_id=ids.get("unk"), pad_id=ids.get("pad"),
        chat_template=template,
    )


def _read_byte_level_bpe(
    data: dict[str, Any], config: dict[str, Any], vocab_size: int, pre_override: str | None
) -> GGUFVocab:
    """GPT-2 style BPE: token strings are already byte-mapped in tokenizer.json."""
    if data.get("normalizer") is not None:
        raise TokenizerError("byte-level BPE tokenizers with a normalizer are not supported by llama.cpp's gpt2 vocab")
    pre = pre_override or detect_pre_tokenizer(data.get("pre_tokenizer"))
    if pre is None:
        raise TokenizerError(
            "unknown pre-tokenizer in tokenizer.json "
            f"({json.dumps(data.get('pre_tokenizer'))[:200]}); pass --tokenizer-pre with one of "
            f"{', '.join(PRE_TOKENIZERS)} (or another llama.cpp name) if you know which one it is"
        )
    added = {int(t["id"]): t for t in data.get("added_tokens", [])}
    by_id: dict[int, str] = {int(i): tok for tok, i in data["model"]["vocab"].items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    tokens, types = _dense_tokens(by_id, vocab_size)
    for i, t in added.items():
        if i < len(types):
            types[i] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    return GGUFVocab(
        model="gpt2", pre=pre, tokens=tokens, token_types=types, merges=merges, scores=None,
        bos_id=None, eos_id=None, unk_id=None, pad_id=None,
        add_bos=_adds_bos(data, config), add_space_prefix=False, chat_template=None,
    )


def _read_sentencepiece(
    model_file: Path, data: dict[str, Any] | None, config: dict[str, Any], vocab_size: int
) -> GGUFVocab:
    """SentencePiece (Llama 2, Mistral v0.x): pieces, scores and types from the .model proto."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    by_id: dict[int, str] = {}
    kinds: dict[int, int] = {}
    scores: dict[int, float] = {}
    for i in range(sp.vocab_size()):
        by_id[i] = sp.id_to_piece(i)
        scores[i] = float(sp.get_score(i))
        if sp.is_unknown(i):
            kinds[i] = int(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            kinds[i] = int(gguf.TokenType.CONTROL)
        elif sp.is_unused(i):
            kinds[i] = int(gguf.TokenType.UNUSED)
        elif sp.is_byte(i):
            kinds[i] = int(gguf.TokenType.BYTE)
        else:
            kinds[i] = int(gguf.TokenType.NORMAL)
    for t in (data or {}).get("added_tokens", []):
        i = int(t["id"])
        if i not in by_id:
            by_id[i] = t["content"]
            scores[i] = -1000.0
            kinds[i] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    tokens, types = _dense_tokens(by_id, vocab_size)
    for i, kind in kinds.items():
        if i < len(types):
            types[i] = kind
    dense_scores = [scores.get(i, -1000.0) for i in range(len(tokens))]
    add_space = True
    if data is not None and data.get("normalizer") is not None:
        add_space = "Prepend" in json.dumps(data["normalizer"])
    elif data is not None and data.get("pre_tokenizer") is not None:
        add_space = json.dumps(data["pre_tokenizer"]).find('"prepend_scheme": "never"') < 0
    return GGUFVocab(
        model="llama", pre="default", tokens=tokens, token_types=types, merges=[], scores=dense_scores,
        bos_id=None, eos_id=None, unk_id=None, pad_id=None,
        add_bos=bool(config.get("add_bos_token", True)), add_space_prefix=add_space, chat_template=None,
    )


def _dense_tokens(by_id: dict[int, str], vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings for ids 0..n-1, padding holes and the tail up to the model's row count."""
    n = max(vocab_size, max(by_id, default=-1) + 1)
    if n > vocab_size:
        raise TokenizerError(f"the tokenizer has {n} tokens but the model only {vocab_size} embedding rows")
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
    if len(set(tokens)) != len(tokens):
        raise TokenizerError("the tokenizer has duplicate token strings; llama.cpp cannot represent it")
    return tokens, types


def _adds_bos(data: dict[str, Any], config: dict[str, Any]) -> bool:
    """Whether encoding prepends BOS: tokenizer_config says so, else the post-processor template."""
    if "add_bos_token" in config:
        return bool(config["add_bos_token"])
    post = data.get("post_processor") or {}
    processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for proc in processors:
        if proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            return bool(single) and "SpecialToken" in single[0]
    return False


def _special_ids_from_config(config: dict[str, Any], tokens: list[str]) -> dict[str, int]:
    """bos/eos/unk/pad ids from the token strings named in tokenizer_config.json."""
    index = {tok: i for i, tok in enumerate(tokens)}
    out: dict[str, int] = {}
    for key in ("bos", "eos", "unk", "pad"):
        value = config.get(f"{key}_token")
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value in index:
            out[key] = index[value]
    return out


def _chat_template(hf_dir: Path, config: dict[str, Any]) -> str | None:
    """transformers 5 writes chat_template.jinja; older directories keep it in tokenizer_config."""
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: llama.cpp reads the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc
