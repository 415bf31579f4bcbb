"""Vocabulary fingerprints: the handshake refuses a device/edge pair that tokenises differently.

Comparing sizes is not enough (two tokenizers of 49,152 tokens can differ in every
entry), so both sides hash the token strings in id order.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

FINGERPRINT_PREFIX = "sha256:"


def vocab_fingerprint(tokens: Iterable[str | bytes]) -> str:
    """A short stable hash of the token list (length-prefixed, so boundaries count)."""
    h = hashlib.sha256()
    n = 0
    for tok in tokens:
        data = tok if isinstance(tok, bytes) else tok.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(4, "little"))
        h.update(data)
        n += 1
    h.update(n.to_bytes(8, "little"))
    return FINGERPRINT_PREFIX + h.hexdigest()[:32]
