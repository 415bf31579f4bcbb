"""``python -m quantize check-pair``: will this device draft and this edge target work together?

What a user runs before deploying a pair:

1. the tokenizers must be identical -- the very rule the DSSD handshake applies
   (:func:`protocol.vocab.pair_vocabularies` over the real tokens of the device's
   llama.cpp token list and of the edge backend's ``vocab_tokens``, padding such as a
   GGUF's ``[PAD<id>]`` rows left out, row counts compared explicitly); a mismatch is
   refused here, naming the differing tokens, instead of at connect time;
2. how often the draft is accepted, measured on built-in chat prompts along the
   target's own greedy continuation (teacher forcing):

   * greedy agreement: the fraction of positions where the draft's top token is the
     target's -- the per-token acceptance of greedy speculative decoding;
   * alpha: the mean of sum_v min(p_v, q_v), the probability that a sampled draft
     token is accepted, with p and q from the same :mod:`protocol.sampling` transform
     the runtime uses (temperature 1 and no truncation by default).

The device side is the real :class:`device_runtime.drafter.LlamaDrafter`, the edge side
any :class:`edge_service.backends.base.TargetModel`, so the numbers are those the
runtime would see.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from dssd_common.gguf_header import GGUFError, scan_gguf
from edge_service.backends.base import TargetModel
from protocol.sampling import SamplingParams, probabilities, rng_for
from protocol.vocab import VocabMismatch, VocabPairing, Vocabulary, pair_vocabularies

from .errors import ToolError

if TYPE_CHECKING:
    from device_runtime.drafter import LlamaDrafter

logger = logging.getLogger(__name__)

#: Short, varied chat prompts: facts, code, a list, free writing.
BUILTIN_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "List three primary colors.",
    "Tell me a short story about a robot that learns to paint.",
)
BACKENDS = ("auto", "torch", "onnx")


class PairMismatch(ToolError):
    """Device and edge tokenize differently: they cannot be deployed together."""


@dataclass(frozen=True)
class PromptResult:
    """Acceptance on one prompt."""

    prompt: str
    positions: int
    greedy_agreement: float
    alpha: float


@dataclass(frozen=True)
class PairReport:
    """Vocabulary identity and measured acceptance of a device/edge pair."""

    device: str
    edge: str
    fingerprint: str
    n_vocab_device: int
    n_vocab_edge: int
    sampling: SamplingParams
    pairing: VocabPairing
    prompts: list[PromptResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def positions(self) -> int:
        return sum(p.positions for p in self.prompts)

    @property
    def greedy_agreement(self) -> float:
        """Pooled over all positions of all prompts."""
        return _pooled(self.prompts, "greedy_agreement")

    @property
    def alpha(self) -> float:
        return _pooled(self.prompts, "alpha")

    def expected_tokens_per_round(self, gamma: int) -> float:
        """(1 - alpha^(gamma+1)) / (1 - alpha): tokens per verify round if acceptances were i.i.d."""
        a = self.alpha
        return float(gamma + 1) if a >= 1.0 else (1.0 - a ** (gamma + 1)) / (1.0 - a)


def _pooled(prompts: Sequence[PromptResult], attr: str) -> float:
    total = sum(p.positions for p in prompts)
    return sum(getattr(p, attr) * p.positions for p in prompts) / total if total else float("nan")


def load_edge(path: str | Path, backend: str = "auto", *, threads: int | None = None) -> TargetModel:
    """The edge model as the edge service would load it; ``auto`` picks ONNX for an ONNX export."""
    from edge_service.backends.onnx_backend import MANIFEST_NAME

    p = Path(path)
    if backend not in BACKENDS:
        raise ToolError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "onnx" if (p / MANIFEST_NAME).is_file() else "torch"
    try:
        if backend == "onnx":
            from edge_service.backends.onnx_backend import OnnxTargetModel

            return OnnxTargetModel(p, threads=threads)
        from edge_service.backends.torch_backend import TorchTargetModel

        return TorchTargetModel(p, threads=threads)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ToolError(f"cannot load edge model {p}: {exc}") from exc


def check_pair(
    device_gguf: str | Path,
    edge_model: str | Path,
    *,
    backend: str = "auto",
    sampling: SamplingParams = SamplingParams(1.0),
    n_tokens: int = 32,
    threads: int | None = None,
    prompts: Sequence[str] = BUILTIN_PROMPTS,
) -> PairReport:
    """Compare vocabularies (raise :class:`PairMismatch` if they differ), then measure acceptance."""
    from device_runtime.drafter import LlamaDrafter

    start = time.perf_counter()
    device_path = Path(device_gguf)
    if not device_path.is_file():
        raise ToolError(f"device GGUF not found: {device_path}")
    try:
        drafter = LlamaDrafter(device_path, n_ctx=_draft_context(device_path), n_threads=threads, max_gamma=1)
    except (ValueError, OSError) as exc:  # llama-cpp-python reports a bad model as ValueError
        raise ToolError(f"llama.cpp cannot load {device_path}: {exc}") from exc
    try:
        edge = load_edge(edge_model, backend, threads=threads)
        pairing = pair_check(drafter.vocab_tokens(), drafter.n_vocab, edge)
        logger.info("vocabulary: %s", pairing.describe())
        results: list[PromptResult] = []
        for i, prompt in enumerate(prompts):
            result = _measure_prompt(drafter, edge, prompt, sampling, n_tokens, pairing.n_tokens, seed=i)
            logger.info("%-60s agreement %.3f  alpha %.3f  (%d positions)", prompt[:60],
                        result.greedy_agreement, result.alpha, result.positions)
            results.append(result)
    finally:
        drafter.close()
    return PairReport(str(device_path), str(edge_model), pairing.fingerprint, drafter.n_vocab, edge.n_vocab, sampling,
                      pairing, results, time.perf_counter() - start)


def _draft_context(path: Path, cap: int = 1024) -> int:
    """Enough context for a chat prompt plus the measured tokens, within what the model was trained on."""
    try:
        meta = scan_gguf(path).metadata
    except GGUFError as exc:
        raise ToolError(str(exc)) from exc
    trained = meta.get(f"{meta.get('general.architecture')}.context_length")
    return min(cap, int(trained)) if isinstance(trained, int) and trained > 0 else cap


def pair_check(device_tokens: Sequence[bytes | str], device_rows: int, edge: TargetModel) -> VocabPairing:
    """The handshake's verdict on this pair, or :class:`PairMismatch` naming the differing tokens."""
    try:
        return pair_vocabularies(Vocabulary.of(device_tokens, device_rows, keep_tokens=True),
                                 Vocabulary.of(edge.vocab_tokens, edge.n_vocab, keep_tokens=True))
    except VocabMismatch as exc:
        raise PairMismatch(f"{exc}. This pair cannot be used together.") from None


def _prompt_ids(drafter: LlamaDrafter, prompt: str) -> list[int]:
    """Chat-formatted with the GGUF's template when it has one, like ``device_runtime --chat``."""
    try:
        text = drafter.chat_prompt([{"role": "user", "content": prompt}])
    except ValueError:  # no chat template: a plain prompt
        return drafter.tokenize(prompt)
    return drafter.tokenize(text, add_bos=False)


def _measure_prompt(
    drafter: LlamaDrafter, edge: TargetModel, prompt: str, sampling: SamplingParams, n_tokens: int,
    n_shared: int, *, seed: int,
) -> PromptResult:
    """Greedy target continuation; at each position compare the draft's distribution with the target's."""
    ids = _prompt_ids(drafter, prompt)
    rng = rng_for(seed, 0)
    seq = edge.new_sequence()
    hits = 0
    overlap = 0.0
    positions = 0
    try:
        # both sides on the shared ids [0, n_shared) only, as the runtime (protocol.vocab)
        p_logits = seq.forward(ids, keep=1)[0, :n_shared]
        committed = list(ids)
        for _ in range(n_tokens):
            target_tok = int(np.argmax(p_logits))
            q = drafter.draft(committed, 1, sampling, rng).q_rows[0, :n_shared]
            p = probabilities(p_logits, sampling)
            hits += int(np.argmax(q)) == target_tok
            overlap += float(np.minimum(p, q).sum(dtype=np.float64))
            positions += 1
            if target_tok in edge.eos_token_ids:
                break
            committed.append(target_tok)
            p_logits = seq.forward([target_tok], keep=1)[0, :n_shared]
    finally:
        seq.release()
    return PromptResult(prompt, positions, hits / positions, overlap / positions)
