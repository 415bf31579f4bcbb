"""ONNX Runtime target backend: an ``python -m quantize edge-export --format onnx`` directory.

Why a second backend: a CPU edge box verifies gamma+1 tokens per round, and ONNX
Runtime does that forward in about 1.1-1.2 single-step times where PyTorch needs
1.4-1.8; it also runs int8 weights (dynamic quantization) and needs neither torch nor
transformers at serving time -- only onnxruntime and numpy.

The exported graph is stateless: it takes the past keys/values of every layer as
inputs and returns logits plus the present keys/values (past + new tokens). Each
sequence keeps its present arrays, so rollback is a slice along the sequence axis and
sessions never share mutable state; the ``InferenceSession`` (weights) is shared.

The directory carries a manifest (:data:`MANIFEST_NAME`) with the tensor layout and
the vocabulary, so loading reads no tokenizer and no config.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edge_service.backends.base import TargetModel, TargetSequence, keep_rows

log = logging.getLogger(__name__)

#: Manifest file written by the exporter next to the ONNX files.
MANIFEST_NAME = "dssd_onnx.json"
#: Manifest format tag; bumped when the graph interface changes.
MANIFEST_FORMAT = "dssd-onnx-kv/1"
INPUT_IDS = "input_ids"
LOGITS = "logits"


def past_names(n_layers: int) -> list[str]:
    """Graph input names of the KV cache, in feed order (key then value, per layer)."""
    return [f"past_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


def present_names(n_layers: int) -> list[str]:
    """Graph output names of the updated KV cache, in the same order as :func:`past_names`."""
    return [f"present_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


@dataclass(frozen=True)
class OnnxManifest:
    """What an edge-export ONNX directory holds; written by the exporter, read here.

    ``files`` maps a variant ("fp32", "fp16", "int8") to its ONNX file name;
    ``default_variant`` is the one served when none is requested (int8 when exported).
    KV tensors have shape (1, n_kv_heads, seq, head_dim).
    """

    name: str
    files: dict[str, str]
    default_variant: str
    n_layers: int
    n_kv_heads: int
    head_dim: int
    n_vocab: int
    max_context: int
    eos_token_ids: list[int]
    vocab_tokens: list[str] = field(repr=False)
    format: str = MANIFEST_FORMAT

    def save(self, directory: Path) -> Path:
        path = directory / MANIFEST_NAME
        path.write_text(json.dumps(asdict(self), ensure_ascii=False), encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: Path) -> "OnnxManifest":
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{directory} has no {MANIFEST_NAME}: not an ONNX edge model "
                "(create one with `python -m quantize edge-export SRC DIR --format onnx`)"
            )
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{path}: format {data.get('format')!r}, this backend reads {MANIFEST_FORMAT}")
        return cls(**data)


class OnnxTargetModel(TargetModel):
    """One ``InferenceSession`` shared by all sequences; each sequence owns its KV arrays."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        variant: str | None = None,
    ) -> None:
        import onnxruntime as ort

        path = Path(model_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"ONNX edge model directory not found: {path}")
        manifest = OnnxManifest.load(path)
        chosen = variant or manifest.default_variant
        if chosen not in manifest.files:
            raise ValueError(f"{path} has no {chosen!r} ONNX model; it has {sorted(manifest.files)}")
        wanted = list(providers or ["CPUExecutionProvider"])
        missing = [p for p in wanted if p not in ort.get_available_providers()]
        if missing:
            raise ValueError(f"ONNX Runtime providers {missing} are not available here; "
                             f"available: {ort.get_available_providers()}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        onnx_path = path / manifest.files[chosen]
        log.info("loading ONNX target %s (%s, providers %s)", onnx_path, chosen, wanted)
        self._session = ort.InferenceSession(str(onnx_path), options, providers=wanted)
        self._past_names = past_names(manifest.n_layers)
        self._output_names = [LOGITS, *present_names(manifest.n_layers)]
        kv_type = {i.name: i.type for i in self._session.get_inputs()}[self._past_names[0]]
        self._kv_dtype = np.float16 if kv_type == "tensor(float16)" else np.float32
        self._kv_shape = (1, manifest.n_kv_heads, 0, manifest.head_dim)
        self.variant = chosen
        self.n_vocab = manifest.n_vocab
        self.max_context = manifest.max_context
        self.vocab_tokens = manifest.vocab_tokens
        self.eos_token_ids = tuple(manifest.eos_token_ids)
        self.name = manifest.name

    def new_sequence(self) -> "OnnxSequence":
        return OnnxSequence(self)

    def empty_cache(self) -> list[np.ndarray]:
        """Zero-length past tensors for every layer (the graph accepts seq = 0)."""
        return [np.zeros(self._kv_shape, self._kv_dtype) for _ in self._past_names]

    def run(self, cache: Sequence[np.ndarray], new_ids: Sequence[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward: (float32 logits (n, V), the present KV arrays including new_ids)."""
        feeds: dict[str, np.ndarray] = {INPUT_IDS: np.asarray([list(new_ids)], dtype=np.int64)}
        for name, kv in zip(self._past_names, cache):
            feeds[name] = np.ascontiguousarray(kv)  # a rolled-back cache is a strided view
        logits, *present = self._session.run(self._output_names, feeds)
        return np.asarray(logits[0], dtype=np.float32), present


class OnnxSequence(TargetSequence):
    """KV cache as the graph's present arrays; rollback slices them."""

    def __init__(self, model: OnnxTargetModel) -> None:
        self._model = model
        self._cache: list[np.ndarray] | None = model.empty_cache()
        self._n = 0

    @property
    def n_cached(self) -> int:
        return self._n

    def forward(self, new_ids: Sequence[int], keep: int | None = None) -> np.ndarray:
        """See `TargetSequence.forward`. The exported graph computes every position's
        logits; the unused rows are dropped here instead of being handed on."""
        n_keep = keep_rows(keep, len(new_ids))
        if self._cache is None:
            raise ValueError("this sequence was released")
        if not len(new_ids):
            raise ValueError("forward needs at least one token")
        if self._n + len(new_ids) > self._model.max_context:
            raise ValueError(f"sequence would exceed the model context of {self._model.max_context}")
        logits, self._cache = self._model.run(self._cache, new_ids)
        self._n += len(new_ids)
        return logits[logits.shape[0] - n_keep :]

    def rollback(self, n_keep: int) -> None:
        if not 0 <= n_keep <= self._n:
            raise ValueError(f"cannot roll back to {n_keep} of {self._n} cached tokens")
        if n_keep < self._n and self._cache is not None:
            self._cache = [kv[:, :, :n_keep] for kv in self._cache]
            self._n = n_keep

    def release(self) -> None:
        self._cache = None
        self._n = 0
