"""The contract between the edge server and a target-model runtime.

The server and the verification math never touch torch or onnxruntime; they see only
this interface. A backend instance serves exactly one session (one sequence, one KV
cache), so sessions never share mutable state; the model weights themselves are shared
through a `TargetModel` that creates backends.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np


class TargetModel(ABC):
    """Loaded weights, shared by every session on the edge."""

    #: Number of rows in the output logits (may exceed the tokenizer's vocabulary).
    n_vocab: int
    #: Longest sequence a session may hold.
    max_context: int
    #: Token strings in id order, for the vocabulary fingerprint in the handshake.
    vocab_tokens: list[str]
    #: End-of-sequence token ids of this model.
    eos_token_ids: tuple[int, ...]
    #: Human-readable model name reported in the handshake.
    name: str

    @abstractmethod
    def new_sequence(self) -> "TargetSequence":
        """A fresh per-session state with an empty KV cache."""

    def forward_batch(
        self,
        sequences: Sequence["TargetSequence"],
        new_ids: Sequence[Sequence[int]],
        keep: Sequence[int | None] | None = None,
    ) -> list[np.ndarray]:
        """`sequences[i].forward(new_ids[i], keep[i])` for every i; their logits in order.

        Used by the verification scheduler to serve rounds of several sessions at once.
        Each sequence ends exactly as if its own `forward` had run. This default runs the
        forwards one after another; a backend that can run them as one batched forward
        (the torch backend) overrides it. The sequences must be distinct.
        """
        keep = keep_list(keep, len(new_ids))
        if len(sequences) != len(new_ids):
            raise ValueError(f"{len(sequences)} sequences but {len(new_ids)} id lists")
        return [seq.forward(ids, k) for seq, ids, k in zip(sequences, new_ids, keep)]


class TargetSequence(ABC):
    """One sequence's KV cache over a shared `TargetModel`."""

    @property
    @abstractmethod
    def n_cached(self) -> int:
        """Tokens currently held in the KV cache."""

    @abstractmethod
    def forward(self, new_ids: Sequence[int], keep: int | None = None) -> np.ndarray:
        """Append `new_ids` to the cache; return float32 logits of the last `keep` positions.

        Shape (keep, n_vocab), or (len(new_ids), n_vocab) when `keep` is None; row i of the
        full result is the next-token logits after the cached prefix plus new_ids[: i + 1].
        Callers ask only for the rows they use (0 for a prefill, gamma + 1 for a
        verification): at a 152k vocabulary every unused row of a 2,000-token prompt is
        600 KB computed, upcast and copied for nothing.
        """

    @abstractmethod
    def rollback(self, n_keep: int) -> None:
        """Drop cached tokens beyond the first `n_keep` (0 <= n_keep <= n_cached)."""

    def can_rollback(self, n_keep: int) -> bool:
        """Whether `rollback(n_keep)` is possible.

        True for any 0 <= n_keep <= n_cached on a full-attention cache. A sliding-window
        layer (Gemma-3's local layers) holds only its window once the sequence is longer:
        it can drop the tokens of its last forward (a rejected draft) but not go further
        back, so a caller re-syncing to an older prefix starts a fresh sequence instead.
        """
        return 0 <= n_keep <= self.n_cached

    @abstractmethod
    def release(self) -> None:
        """Free the cache; the sequence is unusable afterwards."""


def keep_rows(keep: int | None, n_new: int) -> int:
    """The number of logits rows a `forward(new_ids, keep)` returns (validated)."""
    if keep is None:
        return n_new
    if not 0 <= keep <= n_new:
        raise ValueError(f"keep must be in 0..{n_new} (the new tokens), got {keep}")
    return keep


def keep_list(keep: Sequence[int | None] | None, n: int) -> list[int | None]:
    """`keep` of a batched forward as one entry per id list (None: all rows of each)."""
    if keep is None:
        return [None] * n
    if len(keep) != n:
        raise ValueError(f"{n} id lists but {len(keep)} keep counts")
    return list(keep)
