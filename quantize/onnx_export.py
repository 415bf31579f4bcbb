"""Export a transformers causal LM to a stateless ONNX graph with KV-cache inputs/outputs.

Why a wrapper instead of optimum: optimum-onnx pins transformers < 4.58, and this
project runs transformers 5. The wrapper turns the model's cache object into flat
tensors -- ``input_ids`` and ``past_{key,value}_{i}`` in, ``logits`` and
``present_{key,value}_{i}`` out -- which is exactly what the edge's ONNX backend feeds
and keeps (:mod:`edge_service.backends.onnx_backend`). Export goes through
``torch.onnx.export(dynamo=True)`` with the new-token and past lengths dynamic (the
past may be empty). :func:`reference_logits` gives the PyTorch side of the check
that :mod:`quantize.edge_export` runs on every exported file before declaring it done,
so a silently wrong graph never reaches an edge.
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
            warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's own deprecations
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
    """Write ``out_path`` (+ ``.data`` with the weights); returns the cache layout it uses."""
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

    The export check feeds ONNX Runtime the same two chunks, so both exercise the past inputs.
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


#: Modules whose MatMuls stay float in the int8 model (see :func:`quantize_int8`).
INT8_EXCLUDED_MODULES = (".mlp.down_proj",)


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    """Dynamic int8 quantization of the weight MatMuls (activations quantized per call, per tensor).

    Why dynamic: it needs no calibration data, and on CPU edge boxes the int8 MatMul
    kernels read a quarter of the fp32 weight bytes per verify step. Two choices,
    measured on SmolLM2 (top-1 agreement with fp32 over 37 positions):

    * uint8 weights, per output channel: int8 weights use ORT's u8s8 kernels, whose
      AVX2 pair sums saturate int16 without VNNI (per-channel QInt8 gave 0.00, with
      ``reduce_range`` 0.73); uint8 weights gave 0.76 and were fastest;
    * the FFN down projections stay float (0.76 -> 0.84): their input, the gated
      product, carries the outliers that one per-tensor activation scale cannot hold.
      They are found by module name in the exporter's ``name_scopes`` node metadata.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    start = time.perf_counter()
    size = fp32_path.stat().st_size + sum(p.stat().st_size for p in fp32_path.parent.glob(fp32_path.name + ".data"))
    excluded = _nodes_in_modules(onnx.load(str(fp32_path), load_external_data=False), INT8_EXCLUDED_MODULES)
    if not excluded:
        logger.warning("no %s MatMuls found by name; quantizing every weight MatMul", INT8_EXCLUDED_MODULES)
    try:
        with _quiet_exporters():
            quantize_dynamic(
                fp32_path, int8_path,
                op_types_to_quantize=["MatMul"],
                per_channel=True,
                weight_type=QuantType.QUInt8,
                nodes_to_exclude=excluded,
                use_external_data_format=size > 1.5 * 2**30,  # int8 output stays under protobuf's 2 GiB
            )
    except Exception as exc:  # onnxruntime.quantization raises bare Exceptions
        raise OnnxExportError(f"int8 quantization failed: {type(exc).__name__}: {exc}") from exc
    logger.info("int8 model %s (%.1f MB, %d MatMuls kept float) in %.1fs", int8_path.name,
                int8_path.stat().st_size / 1e6, len(excluded), time.perf_counter() - start)


def _nodes_in_modules(model: Any, module_suffixes: tuple[str, ...]) -> list[str]:
    """MatMul nodes whose torch module path (exporter metadata) ends with one of the suffixes."""
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        if any(f"{suffix}'" in scopes for suffix in module_suffixes):
            names.append(node.name)
    return names
