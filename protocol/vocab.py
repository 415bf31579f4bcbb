"""Vocabulary pairing: which device/edge pairs may work together, and on which ids.

Comparing sizes is not enough (two tokenizers of 49,152 tokens can differ in every
entry), so both sides hash the token strings in id order (`vocab_fingerprint`).

What is hashed is the *real* tokens: the tokenizer's, without padding. Families such as
Qwen2 pad their logits rows to a round number (151,936 rows for a 151,665-token
tokenizer); converters write the extra rows into a GGUF token list as ``[PAD<id>]``
entries, while an HF tokenizer simply stops at ``len(tokenizer)``. `real_token_count`
strips the trailing run of such entries, so a GGUF draft and an HF-directory target of
the same family fingerprint alike. Two models of one family may also pad differently
(Qwen2.5-0.5B has 151,936 rows, Qwen2.5-7B 152,064): the sizes are compared explicitly
(`pair_vocabularies`) and may differ, as long as both cover the real tokens.

The shared id space of a pair is ``[0, n_tokens)``. Ids beyond it are rows one model has
and no tokenizer ever produces; the runtime treats them as impossible on both sides:

* the device draws from ``logits[:n_tokens]`` only, so Q = 0 on padding ids (the tail of
  each Q row stays zero; rows on the wire have the device's width, `device_rows`);
* the edge verifies on ``logits[:, :n_tokens]`` only (a view, no copy), so P = 0 on
  padding ids; a full P_j row sent down is zero-padded to the device's width.

"The target alone" is therefore the target restricted to its tokenizer's tokens: greedy
is the argmax over ``[0, n_tokens)``, sampling the transform of those logits. For a
trained model the padding rows carry no mass anyway; reference runs with transformers
pass ``suppress_tokens=padding_ids(...)`` to `generate` to be the same function.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Sequence

FINGERPRINT_PREFIX = "sha256:"
#: Differing tokens a mismatch message names (the count of all of them is given too).
MAX_NAMED_DIFFERENCES = 5


class VocabMismatch(ValueError):
    """The two sides tokenize differently (or one cannot hold the other's tokens)."""


def _as_bytes(tok: str | bytes) -> bytes:
    return tok if isinstance(tok, bytes) else tok.encode("utf-8", "surrogatepass")


def vocab_fingerprint(tokens: Iterable[str | bytes]) -> str:
    """A short stable hash of the token list (length-prefixed, so boundaries count)."""
    h = hashlib.sha256()
    n = 0
    for tok in tokens:
        data = _as_bytes(tok)
        h.update(len(data).to_bytes(4, "little"))
        h.update(data)
        n += 1
    h.update(n.to_bytes(8, "little"))
    return FINGERPRINT_PREFIX + h.hexdigest()[:32]


def is_padding(token: str | bytes, token_id: int) -> bool:
    """Whether `token` is the ``[PAD<id>]`` filler converters write for a row with no token."""
    return _as_bytes(token) == b"[PAD%d]" % token_id


def real_token_count(tokens: Sequence[str | bytes]) -> int:
    """The number of tokens left once the trailing run of ``[PAD<id>]`` fillers is dropped."""
    n = len(tokens)
    while n and is_padding(tokens[n - 1], n - 1):
        n -= 1
    return n


def padding_ids(n_tokens: int, n_rows: int) -> list[int]:
    """The ids a model of `n_rows` logits rows has beyond its `n_tokens` real tokens."""
    return list(range(n_tokens, n_rows))


@dataclass(frozen=True)
class Vocabulary:
    """One side's vocabulary as pairing sees it.

    `tokens` (the real tokens as bytes) is kept only where a mismatch should name the
    differing tokens (check-pair); the handshake knows the other side by fingerprint and
    row count alone (`announced`).
    """

    fingerprint: str
    n_rows: int  # logits rows of the model
    n_tokens: int | None  # real tokens; None when only announced (implied by the fingerprint)
    tokens: tuple[bytes, ...] | None = None

    @classmethod
    def of(cls, tokens: Sequence[str | bytes], n_rows: int, *, keep_tokens: bool = False) -> "Vocabulary":
        n = real_token_count(tokens)
        real = tokens[:n]
        kept = tuple(_as_bytes(t) for t in real) if keep_tokens else None
        return cls(vocab_fingerprint(real), int(n_rows), n, kept)

    @classmethod
    def announced(cls, fingerprint: str, n_rows: int) -> "Vocabulary":
        """The other side as a Hello describes it."""
        return cls(fingerprint, int(n_rows), None)


@dataclass(frozen=True)
class VocabPairing:
    """A device/edge pair that may work together, and the sizes every round relies on."""

    fingerprint: str
    n_tokens: int  # the shared id space [0, n_tokens): real tokens of both
    device_rows: int  # width of every row on the wire (Q uploads, full P_j downlinks)
    edge_rows: int

    def describe(self) -> str:
        pads = [f"device {self.device_rows - self.n_tokens}", f"edge {self.edge_rows - self.n_tokens}"]
        return (f"identical {self.fingerprint}: {self.n_tokens} real tokens; logits rows: device "
                f"{self.device_rows}, edge {self.edge_rows}; padding rows (never produced): {', '.join(pads)}")


def pair_vocabularies(device: Vocabulary, edge: Vocabulary) -> VocabPairing:
    """The pairing of `device` and `edge`, or `VocabMismatch` saying what differs.

    The one rule for the handshake (`edge_service.session`) and for
    ``python -m quantize check-pair``: the same real tokens in the same order, each side
    with at least as many logits rows as real tokens. Row counts may differ.
    """
    for side, v in (("device", device), ("edge", edge)):
        if v.n_tokens is not None and v.n_tokens > v.n_rows:
            raise VocabMismatch(f"the {side}'s tokenizer has {v.n_tokens} tokens but its model only "
                                f"{v.n_rows} logits rows: it can never produce the last ones")
    if device.fingerprint != edge.fingerprint:
        raise VocabMismatch(_difference(device, edge))
    n = edge.n_tokens if edge.n_tokens is not None else device.n_tokens
    if n is None:
        raise ValueError("pair_vocabularies needs the real-token count of one side")
    if n > device.n_rows or n > edge.n_rows:
        raise VocabMismatch(f"{n} real tokens, but the device's model has {device.n_rows} logits rows "
                            f"and the edge's {edge.n_rows}: both must cover every token")
    return VocabPairing(edge.fingerprint, n, device.n_rows, edge.n_rows)


def _describe(side: str, v: Vocabulary) -> str:
    tokens = "" if v.n_tokens is None else f"{v.n_tokens} real tokens, "
    return f"{side} {v.fingerprint} ({tokens}{v.n_rows} logits rows)"


def _show(tok: bytes) -> str:
    return repr(tok.decode("utf-8", "replace"))


def _difference(device: Vocabulary, edge: Vocabulary) -> str:
    """What differs: the differing ids and tokens where both lists are known, else the hint."""
    head = f"vocabularies differ: {_describe('device', device)} vs {_describe('edge', edge)}"
    if device.tokens is None or edge.tokens is None:
        return (f"{head}. The two models tokenize differently; run `python -m quantize check-pair "
                f"DRAFT.gguf EDGE_MODEL` to see which tokens differ")
    a, b = device.tokens, edge.tokens
    differing = [i for i in range(min(len(a), len(b))) if a[i] != b[i]]
    named = [f"id {i}: device {_show(a[i])} vs edge {_show(b[i])}" for i in differing[:MAX_NAMED_DIFFERENCES]]
    parts = []
    if differing:
        parts.append(f"{len(differing)} ids hold different tokens ({'; '.join(named)}"
                     f"{'; ...' if len(differing) > MAX_NAMED_DIFFERENCES else ''})")
    if len(a) != len(b):
        longer, name = (a, "device") if len(a) > len(b) else (b, "edge")
        extra = longer[min(len(a), len(b)):]
        shown = ", ".join(_show(t) for t in extra[:MAX_NAMED_DIFFERENCES])
        parts.append(f"only the {name} has ids {min(len(a), len(b))}..{len(longer) - 1} "
                     f"({shown}{', ...' if len(extra) > MAX_NAMED_DIFFERENCES else ''})")
    return f"{head}: {'; '.join(parts)}"
