"""Constrained decoding as part of the sampling contract (JSON schema, Lark grammars).

A constraint is a token mask that depends on the generated prefix. Speculative sampling
stays exact for the *constrained* target when both sides apply the same mask to their
logits before the sampling transform (`protocol.sampling`): the edge to P's rows, the
device to Q's, each advanced over the same committed ids. Then P and Q are both
distributions over the allowed tokens, the acceptance rule and the residual are the
usual ones, and the committed tokens follow the constrained target exactly; greedy is
the constrained target's argmax path.

Where the mask applies: to the raw logits of a row, in place (disallowed ids -> -inf),
before temperature / top-k / top-p; `logprobs` stay the raw, unmasked log-softmax (as
vLLM reports them). The row of position i of a round is masked by the matcher state after
committed + draft[:i]. A draft token the mask forbids is a broken device (the edge refuses
the round), since Q gives it probability 0.

One engine on both sides: llguidance (the grammar engine of llama.cpp, vLLM and SGLang).
Why it and not xgrammar: it needs no torch (the device side has none), is one small
wheel, builds its token trie from a plain list of token bytes (both sides derive it from
the same vocabulary strings the handshake fingerprints, so the tokenizers are identical
by construction), computes a mask in tens of microseconds, and compiles JSON schemas and
Lark grammars. The `Start` carries the engine, its version and the grammar itself; the
edge compiles it for its own copy of the vocabulary and refuses (UNSUPPORTED) a different
engine or version, or a grammar it cannot compile.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from typing import Any, Sequence

import numpy as np

import llguidance
from llguidance import numpy as llg_numpy

#: The grammar engine of the sampling contract and its exact version (both sides compare).
ENGINE = "llguidance"
ENGINE_VERSION = metadata.version("llguidance")
#: Grammar kinds a Start may carry: a JSON schema (JSON text) or a Lark grammar.
KINDS = ("json_schema", "lark")
#: JSON is written compactly (no optional whitespace): the separators are then forced
#: tokens, and a model cannot run on in blanks. Part of the contract (both sides compile
#: with it).
JSON_OPTIONS = {"whitespace_flexible": False}
#: Largest grammar text accepted (a schema of a few hundred properties is far below).
MAX_GRAMMAR_BYTES = 256 * 1024


class ConstraintError(ValueError):
    """A grammar that cannot be used: unknown engine/version/kind, or it does not compile."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output is constrained to, as it travels in `Start`.

    `offset`: how many of the Start's prompt ids precede the constrained output (a resumed
    request's prompt includes the output generated so far, which the matcher consumes).
    """

    kind: str
    text: str
    offset: int
    engine: str = ENGINE
    version: str = ENGINE_VERSION

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "text": self.text, "offset": self.offset, "engine": self.engine,
                "version": self.version}

    @classmethod
    def from_json(cls, obj: object) -> "GrammarSpec":
        """From untrusted JSON; raises ConstraintError on anything malformed."""
        if not isinstance(obj, dict):
            raise ConstraintError("grammar must be an object")
        kind, text, offset = obj.get("kind"), obj.get("text"), obj.get("offset")
        engine, version = obj.get("engine"), obj.get("version")
        if not (isinstance(kind, str) and isinstance(text, str) and isinstance(engine, str)
                and isinstance(version, str) and isinstance(offset, int) and not isinstance(offset, bool)):
            raise ConstraintError("grammar needs string kind, text, engine, version and an integer offset")
        return cls(kind, text, offset, engine, version)

    def check(self) -> None:
        """The parts both sides must agree on before compiling anything."""
        if self.engine != ENGINE or self.version != ENGINE_VERSION:
            raise ConstraintError(f"grammar engine {self.engine} {self.version} requested; this side runs "
                                  f"{ENGINE} {ENGINE_VERSION} (the mask is part of the sampling contract: "
                                  "both sides must run the same engine version)")
        if self.kind not in KINDS:
            raise ConstraintError(f"unknown grammar kind {self.kind!r}; supported: {KINDS}")
        if len(self.text.encode("utf-8", "surrogatepass")) > MAX_GRAMMAR_BYTES:
            raise ConstraintError(f"grammar over {MAX_GRAMMAR_BYTES} bytes")
        if self.offset < 0:
            raise ConstraintError("grammar offset must be >= 0")


def json_schema_spec(schema: dict[str, Any] | bool, offset: int) -> GrammarSpec:
    return GrammarSpec("json_schema", json.dumps(schema, separators=(",", ":")), offset)  # property order matters


# -- the tokenizer both sides build from the fingerprinted vocabulary -----------------------


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable stand-ins for the 256 bytes (bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_SPECIAL = re.compile(r"^(<\|[^|]*\|>|</?s>|<unk>|<pad>|<mask>)$")
_SPM_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_bytes(tokens: Sequence[str | bytes]) -> tuple[list[bytes], list[int]]:
    """The bytes each vocabulary string stands for, and the ids of special tokens.

    Byte-level BPE strings (GPT-2 / SmolLM2 / Llama 3) map through the byte decoder;
    SentencePiece strings turn "▁" into a space and "<0xNN>" into the byte. Special tokens
    (`<|...|>`, `<s>`, ...) are marked so that no grammar emits them as text.
    """
    texts = [t.decode("utf-8", "surrogateescape") if isinstance(t, bytes) else t for t in tokens]
    dec = _byte_decoder()
    byte_level = sum(1 for t in texts if "Ġ" in t) > sum(1 for t in texts if "▁" in t)
    out: list[bytes] = []
    special: list[int] = []
    for i, t in enumerate(texts):
        if _SPECIAL.match(t):
            special.append(i)
            out.append(t.encode("utf-8", "surrogateescape"))
        elif byte_level and all(c in dec for c in t):
            out.append(bytes(dec[c] for c in t))
        elif (m := _SPM_BYTE.match(t)) is not None:
            out.append(bytes([int(m.group(1), 16)]))
        else:
            out.append(t.replace("▁", " ").encode("utf-8", "surrogateescape"))
    return out, special


class _Tokenizer:
    """What `llguidance.TokenizerWrapper` reads. Encoding is one id per byte (every byte
    has a token in these vocabularies): llguidance only tokenizes to check its own forced
    tokens, and the mask is computed over the token trie either way."""

    def __init__(self, tokens: list[bytes], special: list[int], eos: int) -> None:
        self.tokens = tokens
        self.special_token_ids = special
        self.eos_token_id = eos
        self.bos_token_id = None
        self._byte_ids: dict[int, int] = {}
        for i, t in enumerate(tokens):
            if len(t) == 1 and i not in set(special):
                self._byte_ids.setdefault(t[0], i)

    def __call__(self, s: str | bytes) -> list[int]:
        data = s.encode("utf-8") if isinstance(s, str) else s
        return [self._byte_ids[b] for b in data if b in self._byte_ids]


def build_tokenizer(tokens: Sequence[str | bytes], eos_ids: Sequence[int], n_vocab: int) -> "llguidance.LLTokenizer":
    """The llguidance tokenizer of a vocabulary (the same on both sides: the handshake has
    checked that their token strings and row counts are equal)."""
    bts, special = token_bytes(tokens)
    if not eos_ids:
        raise ConstraintError("constrained decoding needs the model's EOS id")
    wrapper = llguidance.TokenizerWrapper(_Tokenizer(bts, special, int(eos_ids[0])))
    return llguidance.LLTokenizer(wrapper, n_vocab=n_vocab, eos_token=[int(e) for e in eos_ids])


def compile_grammar(spec: GrammarSpec) -> str:
    """The llguidance grammar of a spec (raises ConstraintError)."""
    spec.check()
    try:
        if spec.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(spec.text, defaults=JSON_OPTIONS)
        return llguidance.LLMatcher.grammar_from_lark(spec.text)
    except (ValueError, TypeError) as exc:
        raise ConstraintError(f"the {spec.kind} grammar does not compile: {exc}") from None


# -- the matcher of one request --------------------------------------------------------------


class Constraint:
    """One request's grammar state at its committed ids, and the masks after them.

    `masks(ids)` gives the masks of len(ids) + 1 consecutive positions (after committed,
    committed + ids[:1], ...) without moving the committed state; `advance(ids)` commits.
    Masks are bit-packed int32 words (32 ids each), applied with `apply`.
    """

    def __init__(self, tokenizer: "llguidance.LLTokenizer", spec: GrammarSpec, n_vocab: int) -> None:
        self.spec = spec
        self.n_vocab = n_vocab
        self._m = llguidance.LLMatcher(tokenizer, compile_grammar(spec), log_level=0)
        if self._m.is_error():
            raise ConstraintError(f"the {spec.kind} grammar does not compile: {self._m.get_error()}")
        self._words = llg_numpy.get_bitmask_shape(1, n_vocab)[1]
        self._eos = frozenset(int(t) for t in tokenizer.eos_tokens)
        self._pushed = 0  # drafted tokens consumed since the last pop
        self._draft_ended = False  # EOS drafted since the last pop
        # after the grammar has ended (EOS consumed) only EOS may follow: such rows are
        # never emitted (the output ends at the first EOS) but must be distributions
        self._eos_only = np.zeros(self._words, np.int32)
        for t in self._eos:
            if t < n_vocab:
                self._eos_only.view(np.uint32)[t >> 5] |= np.uint32(1 << (t & 31))

    def masks(self, ids: Sequence[int], out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """(len(ids) + 1, words) masks along `ids`, and how many of `ids` the grammar allows
        (masks past the first forbidden id are all zero)."""
        n = len(ids) + 1
        if out is None:
            out = np.empty((n, self._words), np.int32)
        out[:n] = 0
        ok = consumed = 0
        ended = self._m.is_stopped()
        for i in range(n):
            if ended:
                out[i] = self._eos_only
            else:
                llg_numpy.fill_next_token_bitmask(self._m, out, i)
            if i == n - 1 or not self._allowed(out[i], int(ids[i])):
                break
            ok += 1
            if ended:
                continue
            if int(ids[i]) in self._eos:  # the end: not consumed, so the rollback stays simple
                ended = True
                continue
            if not self._m.consume_token(int(ids[i])):
                ok -= 1
                break
            consumed += 1
        if consumed and not self._m.rollback(consumed):
            raise ConstraintError(f"cannot roll the grammar back by {consumed} tokens")
        return out[:n], ok

    def next_mask(self, out: np.ndarray) -> None:
        """The mask after the current (drafted) state into a (words,) int32 row."""
        if self.stopped:
            out[:] = self._eos_only
        else:
            llg_numpy.fill_next_token_bitmask(self._m, out[np.newaxis], 0)

    def push(self, token: int) -> None:
        """Advance over a drafted token (undone by `pop`)."""
        if self.stopped or int(token) in self._eos:
            self._draft_ended = True
            return
        if not self._m.consume_token(int(token)):
            raise ConstraintError(f"drafted token {token} is not allowed by the grammar: {self._m.get_error()}")
        self._pushed += 1

    def pop(self) -> None:
        """Undo every `push` since the last `pop`: back at the committed ids."""
        n, self._pushed, self._draft_ended = self._pushed, 0, False
        if n and not self._m.rollback(n):
            raise ConstraintError(f"cannot roll the grammar back by {n} tokens")

    @property
    def words(self) -> int:
        return self._words

    def _allowed(self, words: np.ndarray, token: int) -> bool:
        return 0 <= token < self.n_vocab and bool((int(words[token >> 5]) >> (token & 31)) & 1)

    def advance(self, ids: Sequence[int]) -> None:
        """Commit ids (raises ConstraintError on one the grammar forbids)."""
        for t in ids:
            if self._m.is_stopped() and int(t) in self._eos:
                continue  # the output already ended: EOS again (a bonus after EOS) changes nothing
            if not self._m.consume_token(int(t)):
                raise ConstraintError(f"token {t} is not allowed by the grammar here: {self._m.get_error()}")

    @property
    def accepting(self) -> bool:
        return self._m.is_accepting()

    @property
    def stopped(self) -> bool:
        """The output has ended (EOS committed, or drafted since the last `pop`)."""
        return self._draft_ended or self._m.is_stopped()

    def apply(self, logits: np.ndarray, words: np.ndarray) -> None:
        """Disallowed ids of a (V,) or (n, V) logits array to -inf, in place. V may be
        narrower than the mask (an edge verifying on the real tokens only, padding cut off)."""
        allowed = unpack(words, logits.shape[-1])
        np.copyto(logits, np.float32(-np.inf), where=~allowed)


def unpack(words: np.ndarray, n_vocab: int) -> np.ndarray:
    """Bit-packed int32 mask words -> (…, n_vocab) bool (bit b of word w is id 32w + b)."""
    bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=-1, bitorder="little")
    return bits[..., :n_vocab].view(bool)
