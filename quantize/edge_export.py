"""``python -m quantize edge-export``: a GGUF or HF model -> an edge model directory.

Why: the edge verifies at full (or chosen) precision while the device drafts with a
small GGUF. Users often only have the GGUF; this turns it (or an HF checkpoint) into
what the edge backends load:

* ``--format safetensors``: an HF directory at fp32/fp16/bf16 for the torch backend
  (a GPU box), with the tokenizer;
* ``--format onnx``: ``model.onnx`` with KV-cache inputs/outputs (and
  ``model.int8.onnx`` with ``--int8``) plus the manifest the ONNX backend reads;
* ``--format both``: both in one directory.

A GGUF source is dequantized by transformers. Its vocabulary for the handshake is
copied verbatim from the GGUF (the device's own token list), and the HF tokenizer's
pre-tokenizer is corrected where transformers' GGUF loader simplifies it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dssd_common.gguf_header import GGUFError, read_token_strings, scan_gguf
from edge_service.backends.onnx_backend import MANIFEST_NAME, OnnxManifest, OnnxTargetModel

from .errors import ToolError
from .onnx_export import OnnxExportError, export_onnx, quantize_int8, reference_logits
from .tokenizer_meta import hf_pre_tokenizer

logger = logging.getLogger(__name__)

FORMATS = ("safetensors", "onnx", "both")
#: --dtype -> torch dtype name.
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
#: ONNX Runtime has no bf16 kernels for most CPU ops; fp16 graphs are meant for CUDA.
ONNX_DTYPES = ("fp32", "fp16")
ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.onnx", "int8": "model.int8.onnx"}
#: Largest tolerated |ONNX - torch| logit difference of the export self-check, per dtype,
#: relative to the largest |logit| (kernels differ in summation order; int8 is not checked).
_CHECK_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
_CHECK_IDS = [1, 5, 9, 14, 3, 7, 2, 11]
_CHECK_SPLIT = 5


class EdgeExportError(ToolError):
    """The source cannot be exported as asked."""


@dataclass(frozen=True)
class ExportResult:
    """What was written, for the CLI's stdout."""

    out_dir: Path
    files: list[str]
    onnx_check: dict[str, float] = field(default_factory=dict)  # variant -> max |logit diff| vs torch
    seconds: float = 0.0


@dataclass(frozen=True)
class _Source:
    model: Any
    tokenizer: Any
    vocab_tokens: list[str]
    gguf_pre: str | None
    name: str


def edge_export(
    src: str | Path,
    out_dir: str | Path,
    *,
    fmt: str = "both",
    dtype: str = "fp32",
    int8: bool = False,
    overwrite: bool = False,
    threads: int | None = None,
) -> ExportResult:
    """Export ``src`` into ``out_dir``; validates the options before loading anything."""
    src_p, out = Path(src), Path(out_dir)
    start = time.perf_counter()
    _check_options(src_p, out, fmt, dtype, int8, overwrite)
    import torch

    if threads:
        torch.set_num_threads(threads)
    source = _load_source(src_p)
    out.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(source, out)
    source.model.generation_config.save_pretrained(out)
    if fmt in ("safetensors", "both"):  # the same dtype as the ONNX export, so no cast back is needed
        source.model.to(getattr(torch, DTYPES[dtype])).save_pretrained(out)
    else:
        source.model.config.save_pretrained(out)
    checks: dict[str, float] = {}
    if fmt in ("onnx", "both"):
        checks = _export_onnx_files(source, out, dtype, int8, threads)
    files = sorted(p.name for p in out.iterdir())
    return ExportResult(out, files, checks, time.perf_counter() - start)


def _check_options(src: Path, out: Path, fmt: str, dtype: str, int8: bool, overwrite: bool) -> None:
    if fmt not in FORMATS:
        raise EdgeExportError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise EdgeExportError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if fmt != "safetensors" and dtype not in ONNX_DTYPES:
        raise EdgeExportError(f"ONNX export supports --dtype {' or '.join(ONNX_DTYPES)}, not {dtype}")
    if int8 and fmt == "safetensors":
        raise EdgeExportError("--int8 quantizes the ONNX model; use --format onnx or both")
    if int8 and dtype != "fp32":
        raise EdgeExportError("--int8 starts from the fp32 ONNX model; use --dtype fp32")
    if not src.exists():
        raise EdgeExportError(f"source not found: {src}")
    if src.is_file() and src.suffix != ".gguf":
        raise EdgeExportError(f"{src} is a file but not a .gguf; pass a GGUF or an HF model directory")
    if src.is_dir() and not (src / "config.json").is_file():
        raise EdgeExportError(f"{src} is not an HF model directory (no config.json)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise EdgeExportError(f"{out} exists and is not empty; pass --overwrite to write into it")


def _load_source(src: Path) -> _Source:
    """fp32 model + tokenizer; transformers' refusals (unknown architecture...) become one line."""
    logger.info("loading %s", src)
    try:
        return _load_with_transformers(src)
    except (ValueError, OSError, KeyError) as exc:
        raise EdgeExportError(f"transformers cannot load {src}: {exc}") from exc


def _load_with_transformers(src: Path) -> _Source:
    """A GGUF is dequantized, then detached from transformers' GGUF quantizer so it can be saved."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if src.is_dir():
        from edge_service.backends.torch_backend import read_vocab_tokens

        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(src))
        return _Source(model.eval(), tokenizer, read_vocab_tokens(src), None, src.name)

    try:
        tokens = read_token_strings(src)
        pre = scan_gguf(src).metadata.get("tokenizer.ggml.pre")
    except GGUFError as exc:
        raise EdgeExportError(str(exc)) from exc
    kwargs = {"gguf_file": src.name}
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), **kwargs)
    # A GGUF-loaded model refuses save_pretrained (it is marked as quantized); rebuild a
    # plain one from its config and weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(loaded).__name__]
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return _Source(model.eval(), tokenizer, tokens, pre if isinstance(pre, str) else None, src.name)


def _save_tokenizer(source: _Source, out: Path) -> None:
    """Save the HF tokenizer, restoring the GGUF's pre-tokenizer where transformers simplified it."""
    source.tokenizer.save_pretrained(out)
    path = out / "tokenizer.json"
    spec = hf_pre_tokenizer(source.gguf_pre) if source.gguf_pre else None
    if spec is None or not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("pre_tokenizer") != spec:
        logger.info("tokenizer.json: pre-tokenizer set to llama.cpp's %r", source.gguf_pre)
        data["pre_tokenizer"] = spec
        path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def _export_onnx_files(source: _Source, out: Path, dtype: str, int8: bool, threads: int | None) -> dict[str, float]:
    """model.onnx (fp32/fp16), optionally model.int8.onnx, the manifest, then each file checked."""
    import torch

    model = source.model.to(getattr(torch, DTYPES[dtype]))
    config = model.config
    max_context = int(getattr(config, "max_position_embeddings", 2048))
    layout = export_onnx(model, out / ONNX_FILES[dtype], max_context=max_context)
    files = {dtype: ONNX_FILES[dtype]}
    if int8:
        quantize_int8(out / ONNX_FILES["fp32"], out / ONNX_FILES["int8"])
        files["int8"] = ONNX_FILES["int8"]
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = config.eos_token_id
    eos_ids = list(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
    manifest = OnnxManifest(
        name=source.name,
        files=files,
        default_variant="int8" if int8 else dtype,
        n_layers=layout.n_layers,
        n_kv_heads=layout.n_kv_heads,
        head_dim=layout.head_dim,
        n_vocab=int(config.vocab_size),
        max_context=max_context,
        eos_token_ids=[int(e) for e in eos_ids],
        vocab_tokens=source.vocab_tokens,
    )
    manifest.save(out)
    logger.info("wrote %s", out / MANIFEST_NAME)
    reference = reference_logits(model, _CHECK_IDS, split=_CHECK_SPLIT)
    return {variant: _check_variant(out, variant, reference, threads) for variant in files}


def _check_variant(out: Path, variant: str, reference: np.ndarray, threads: int | None) -> float:
    """Max |logit diff| of one exported file against PyTorch, through the edge backend itself."""
    seq = OnnxTargetModel(out, variant=variant, threads=threads).new_sequence()
    got = np.concatenate([seq.forward(_CHECK_IDS[:_CHECK_SPLIT]), seq.forward(_CHECK_IDS[_CHECK_SPLIT:])])
    diff = float(np.max(np.abs(got - reference)))
    logger.info("ONNX %s vs torch: max |logit diff| %.2e over %d positions", variant, diff, len(_CHECK_IDS))
    tolerance = _CHECK_TOLERANCE.get(variant, np.inf) * max(1.0, float(np.abs(reference).max()))
    if not diff <= tolerance:  # also catches NaN
        raise OnnxExportError(f"exported {out / ONNX_FILES[variant]} differs from PyTorch by {diff:.3g} "
                              f"(tolerance {tolerance:.3g}); the export is wrong")
    return diff
