"""The draft model on the device: a GGUF run by llama.cpp, sampled in numpy.

llama.cpp's own sampler does not return the distribution it sampled from, and the
verification is exact only with that distribution, so the drafter reads raw logits and
samples with `protocol.sampling`. Q rows of the current draft are kept in a
preallocated buffer for the residual resample after a rejection. What that needs of
llama-cpp-python beyond its public `Llama` API goes through `device_runtime.llama_adapter`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from dssd_common.prefix import common_prefix_len
from protocol.sampling import SamplingParams, draw
from protocol.vocab import Vocabulary

if TYPE_CHECKING:
    from device_runtime.llama_adapter import LlamaModel
    from protocol.constraints import Constraint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Draft:
    """One round's draft. Arrays are views into the drafter's buffers: valid until the next draft."""

    ids: np.ndarray  # (gamma,) int32
    q_draft: np.ndarray  # (gamma,) float32, q_i(x_i)
    q_rows: np.ndarray  # (gamma, V) float32, the full Q_i


class LlamaDrafter:
    """Keeps one llama.cpp context whose KV cache follows the committed sequence."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        max_gamma: int = 16,
        f32_kv_cache: bool = False,
        n_gpu_layers: int = 0,
    ) -> None:
        """`n_gpu_layers`: layers offloaded to a GPU (Jetson; -1 for all) when llama.cpp was
        built with CUDA/Metal/Vulkan; the default 0 keeps the whole draft on the CPU."""
        # imported here, as llama_cpp was: importing device_runtime does not load llama.cpp
        from device_runtime.llama_adapter import LlamaModel

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"draft model not found: {path}")
        threads = n_threads or os.cpu_count() or 1
        # f32_kv_cache: bit-comparable with torch in tests; the f16 default differs by ~1e-2
        self._model: LlamaModel = LlamaModel.open(path, n_ctx=n_ctx, n_threads=threads,
                                                  n_gpu_layers=n_gpu_layers, exact=f32_kv_cache)
        self.llm = self._model.llm  # the public llama_cpp.Llama API: eval, tokenize, metadata
        self.path = path
        self.n_vocab = self._model.n_vocab
        #: the fingerprint of the real tokens, and their count: ids from `n_real_tokens` on are
        #: padding rows (a GGUF's ``[PAD<id>]`` entries) that the draft never produces
        self.vocabulary = Vocabulary.of(self._model.vocab_texts(), self.n_vocab)
        self.n_real_tokens = int(self.vocabulary.n_tokens or 0)
        self.n_ctx = n_ctx
        self._tokens: list[int] = []  # exactly what the KV cache holds
        self._eog: tuple[int, ...] | None = None
        # two slots: a pipelined draft fills one while the other's Q rows still serve
        # the residual resample of the round in flight
        self.max_gamma = max_gamma
        # zeros: draws write [0, n_tokens) only, so the padding tail of every Q row stays Q = 0
        self._q_rows = np.zeros((2, max_gamma + 2, self.n_vocab), np.float32)
        self._ids = np.empty((2, max_gamma + 2), np.int32)
        self._q_draft = np.empty((2, max_gamma + 2), np.float32)
        self._mask = np.empty((self.n_vocab + 31) // 32, np.int32)  # a grammar's bit-packed mask

    # -- vocabulary -----------------------------------------------------------------

    def vocab_tokens(self) -> list[bytes]:
        return self._model.vocab_texts()

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """End-of-generation ids as llama.cpp defines them (EOS, EOT, ...)."""
        if self._eog is None:
            self._eog = self._model.eog_ids()
        return self._eog

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def detokenize(self, ids: Sequence[int]) -> bytes:
        return self.llm.detokenize(list(ids), special=False)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for chat messages, through the GGUF's own chat template."""
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{self.path.name} has no chat template; pass a plain prompt")
        return self._model.chat_prompt(template, messages)

    # -- decoding -------------------------------------------------------------------

    def _logits_after(self, committed: Sequence[int]) -> np.ndarray:
        """Bring the KV cache to `committed` (reusing the common prefix); last-position logits."""
        n = len(committed)
        if n == 0:
            raise ValueError("need at least one token of context")
        if n > self.n_ctx:
            raise ValueError(f"context of {n} tokens exceeds the draft's n_ctx {self.n_ctx}")
        keep = min(common_prefix_len(self._tokens, committed), n - 1)  # the last token is re-evaluated
        self._model.truncate(keep)
        del self._tokens[keep:]
        self._eval(committed[keep:])
        return self._last_logits()

    def _eval(self, ids: Sequence[int]) -> None:
        self.llm.eval(list(ids))
        self._tokens.extend(ids)

    def _last_logits(self) -> np.ndarray:
        return self._model.last_logits()

    def draft(
        self,
        committed: Sequence[int],
        gamma: int,
        params: SamplingParams,
        rng: np.random.Generator,
        *,
        slot: int = 0,
        keep_going: Callable[[np.ndarray], bool] | None = None,
        start: int = 0,
        constraint: "Constraint | None" = None,
    ) -> Draft:
        """Sample up to gamma tokens after `committed`, keeping each exact Q_i.

        `keep_going(ids_so_far)` is asked before each further token (pipelined drafting
        stops early when the verdict makes the work useless). Results live in buffer
        `slot` (0 or 1) until the next draft into the same slot.

        `start` > 0 extends the draft already in `slot` (its first `start` tokens, drafted
        after `committed`) to `gamma` tokens, in place: a draft made ahead that the next
        round wants longer costs only the extra tokens, and no Q row is copied.

        `constraint` (a request's grammar at the committed ids): each position's logits are
        masked in place before the draw, so Q_i is the constrained draft's distribution,
        as the edge masks P_i; the grammar is back at the committed ids on return. Under a
        grammar the draft ends at EOS (it may then be shorter than gamma).
        """
        if gamma > self._q_rows.shape[1]:
            raise ValueError(f"gamma {gamma} exceeds the drafter's buffer of {self._q_rows.shape[1]}")
        if len(committed) + gamma > self.n_ctx:
            raise ValueError("draft would exceed the draft model's context")
        if start < 0 or start and start >= gamma:
            raise ValueError(f"start {start} must be in 0..gamma-1 (gamma {gamma})")
        ids, q_draft, q_rows = self._ids[slot], self._q_draft[slot], self._q_rows[slot]
        n_tokens = self.n_real_tokens  # padding ids (protocol.vocab) are never drawn: Q = 0 there
        if start and constraint is not None:
            raise ValueError("a constrained draft cannot extend a draft made ahead")
        logits = self._logits_after([*committed, *ids[:start].tolist()] if start else committed)
        n = start
        try:
            for i in range(start, gamma):
                if i > start and keep_going is not None and not keep_going(ids[:i]):
                    break
                if constraint is not None:
                    constraint.next_mask(self._mask)
                    constraint.apply(logits, self._mask)
                # Q_i is kept whole (the residual resample reads it); the draw itself runs over
                # the top-k survivors only. Greedy still writes its one-hot row: DSD uploads it.
                tok = draw(logits[:n_tokens], params, rng, q_rows[i, :n_tokens])
                ids[i] = tok
                q_draft[i] = q_rows[i, tok]
                n = i + 1
                if constraint is not None:
                    constraint.push(tok)
                    if constraint.stopped:  # EOS under a grammar: nothing may follow it
                        break
                if i + 1 < gamma:
                    self._eval([tok])
                    logits = self._last_logits()
        finally:
            if constraint is not None:
                constraint.pop()
        return Draft(ids[:n], q_draft[:n], q_rows[:n])

    def next_token(
        self, committed: Sequence[int], params: SamplingParams, rng: np.random.Generator,
        constraint: "Constraint | None" = None,
    ) -> int:
        """Device-only decoding: one token from the draft model alone."""
        return int(self.draft(committed, 1, params, rng, constraint=constraint).ids[0])

    def close(self) -> None:
        self._model.close()
