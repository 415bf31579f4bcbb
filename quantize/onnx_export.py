"""Export a transformers causal LM to a stateless ONNX graph with KV-cache inputs/outputs.

Why a wrapper instead of optimum: optimum-onnx pins transformers < 4.58, and this
project runs transformers 5. The wrapper turns the model's cache object into flat
tensors -- ``input_ids`` and ``past_{key,value}_{i}`` in, ``logits`` and
``present_{key,value}_{i}`` out -- which is exactly what the edge's ONNX backend feeds
and keeps (:mod:`edge_service.backends.onnx_backend`). Export goes through
``torch.onnx.export(dynamo=True)`` with the new-token and past lengths dynamic (the
past may be empty). Every export is checked against PyTorch on a short sequence
before it is declared done, so a silently wrong graph never reaches an edge.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_service.backends.onnx_backend import INPUT_IDS, LOGITS, past_names, present_names

from .errors import ToolError

logger = logging.getLogger(__name__)

#: model_type values whose attention is plain (full) causal attention with a
#: (batch, kv_heads, seq, head_dim) cache -- the layout the backend slices.
ONNX_MODEL_TYPES = ("llama", "mistral", "qwen2")


class OnnxExportError(ToolError):
    """The model cannot be exported, or the export does not match PyTorch."""


@dataclass(frozen=True)
class KVLayout:
    """Cache geometry of one model, measured by running it (not trusted from the config)."""

    n_layers: int
    n_kv_heads: int
    head_dim: int


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """Keep stdout for results and stderr readable while torch.onnx / ORT quantization run.

    torch.onnx prints its progress to stdout, onnxscript logs every rewrite at INFO and
    onnxruntime.quantization logs through the root logger. Unless this module logs at
    DEBUG, their output goes to stderr at WARNING and above; levels are restored after.
    """
    levels = {"onnxscript": logging.WARNING, "onnx_ir": logging.WARNING, "torch.onnx": logging.WARNING,
              "": logging.ERROR}  # "" is the root logger (ORT quantization's advice lines)
    saved = {name: logging.getLogger(name).level for name in levels}
    if not logger.isEnabledFor(logging.DEBUG):
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _wrapper_class() -> type:
    """Build the wrapper lazily so importing this module does not import torch."""
    import torch
    from transformers import DynamicCache

    class KVCacheWrapper(torch.nn.Module):
        """(input_ids, *past) -> (logits, *present): the model with its cache as plain tensors."""

        def __init__(self, model: Any, n_layers: int) -> None:
            super().__init__()
            self.model = model
            self.n_layers = n_layers

        def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
            cache = DynamicCache(config=self.model.config)
            for i in range(self.n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            n_past = past[0].shape[2]
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0) + n_past
            out = self.model(input_ids=input_ids, cache=cache, position_ids=positions, use_cache=True)
            present: list[torch.Tensor] = []
            for layer in out.cache.layers[: self.n_layers]:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return KVCacheWrapper


def kv_layout(model: Any) -> KVLayout:
    """Run one token through the model and read the cache shapes it produced."""
    import torch

    model_type = getattr(model.config, "model_type", None)
    if model_type not in ONNX_MODEL_TYPES:
        raise OnnxExportError(
            f"ONNX export supports model types {', '.join(ONNX_MODEL_TYPES)}; got {model_type!r} "
            "(export --format safetensors and serve it with the torch backend instead)"
        )
    with torch.inference_mode():
        out = model(input_ids=torch.zeros((1, 1), dtype=torch.long), use_cache=True)
    layers = out.cache.layers
    shapes = {tuple(layer.keys.shape) for layer in layers} | {tuple(layer.values.shape) for layer in layers}
    if len(shapes) != 1:
        raise OnnxExportError(f"layers have different cache shapes {sorted(shapes)}; not supported")
    (batch, heads, seq, head_dim), = shapes
    if (batch, seq) != (1, 1):
        raise OnnxExportError(f"unexpected cache shape {(batch, heads, seq, head_dim)} for one token")
    return KVLayout(len(layers), heads, head_dim)


def export_onnx(model: Any, out_path: Path, *, max_context: int) -> KVLayout:
    """Write ``out_path`` (+ ``.data`` with the weights) and check it against PyTorch."""
    import torch
    from torch.export import Dim

    model.eval()
    layout = kv_layout(model)
    dtype = next(model.parameters()).dtype
    wrapper = _wrapper_class()(model, layout.n_layers).eval()
    example_past = 3
    ids = torch.tensor([[1, 2]], dtype=torch.long)
    past = tuple(
        torch.randn(1, layout.n_kv_heads, example_past, layout.head_dim, dtype=dtype)
        for _ in range(2 * layout.n_layers)
    )
    seq = Dim("seq", min=1, max=max_context)
    past_len = Dim("past", min=0, max=max_context)
    start = time.perf_counter()
    logger.info("exporting %d-layer model to %s (torch.onnx dynamo)", layout.n_layers, out_path)
    try:
        with _quiet_exporters(), torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                wrapper,
                (ids, *past),
                str(out_path),
                dynamo=True,
                input_names=[INPUT_IDS, *past_names(layout.n_layers)],
                output_names=[LOGITS, *present_names(layout.n_layers)],
                dynamic_shapes={"input_ids": {1: seq}, "past": tuple({2: past_len} for _ in past)},
                optimize=True,
                external_data=True,
            )
    except Exception as exc:  # torch.onnx raises many unrelated types; report one line
        raise OnnxExportError(f"torch.onnx.export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    logger.info("exported in %.1fs", time.perf_counter() - start)
    return layout


def reference_logits(model: Any, ids: list[int], split: int) -> np.ndarray:
    """PyTorch logits for ``ids`` fed as two chunks (prefix, rest) through a cache.

    Matches how the check below feeds ONNX Runtime, so both exercise the past inputs.
    """
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    rows: list[np.ndarray] = []
    with torch.inference_mode():
        for chunk in (ids[:split], ids[split:]):
            out = model(input_ids=torch.tensor([chunk]), cache=cache, use_cache=True)
            rows.append(out.logits[0].float().numpy())
    return np.concatenate(rows)


def onnx_logits(path: Path, layout: KVLayout, ids: list[int], split: int, *, threads: int = 1) -> np.ndarray:
    """ONNX Runtime logits for ``ids`` in the same two chunks, starting from an empty past."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    kv_type = np.float16 if session.get_inputs()[1].type == "tensor(float16)" else np.float32
    cache = [np.zeros((1, layout.n_kv_heads, 0, layout.head_dim), kv_type) for _ in range(2 * layout.n_layers)]
    rows: list[np.ndarray] = []
    for chunk in (ids[:split], ids[split:]):
        feeds = {INPUT_IDS: np.asarray([chunk], dtype=np.int64), **dict(zip(past_names(layout.n_layers), cache))}
        logits, *cache = session.run([LOGITS, *present_names(layout.n_layers)], feeds)
        rows.append(np.asarray(logits[0], dtype=np.float32))
    return np.concatenate(rows)


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    """Dynamic int8 quantization of the MatMul weights (activations stay float, per-row scales at run time).

    Why dynamic: it needs no calibration data, and on CPU edge boxes the int8 MatMul
    kernels read a quarter of the fp32 weight bytes per verify step.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    start = time.perf_counter()
    size = fp32_path.stat().st_size + sum(p.stat().st_size for p in fp32_path.parent.glob(fp32_path.name + ".data"))
    try:
        with _quiet_exporters():
            quantize_dynamic(
                fp32_path, int8_path,
                op_types_to_quantize=["MatMul"],
                per_channel=True,
                weight_type=QuantType.QInt8,
                use_external_data_format=size > 1.5 * 2**30,  # int8 output stays under protobuf's 2 GiB
            )
    except Exception as exc:  # onnxruntime.quantization raises bare Exceptions
        raise OnnxExportError(f"int8 quantization failed: {type(exc).__name__}: {exc}") from exc
    logger.info("int8 model %s (%.1f MB) in %.1fs", int8_path.name, int8_path.stat().st_size / 1e6,
                time.perf_counter() - start)
