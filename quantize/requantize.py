"""Re-quantize GGUF models: dequantize to F16, then quantize with llama.cpp.

Why this exists: llama.cpp's quantizer refuses (or silently degrades) when fed a
model that is already quantized, and the only real model this project can obtain
ships as a Q4_1 GGUF. Deriving other precisions from it (Q4_0 for a realistic draft,
Q8_0, Q4_K_M, ...) therefore goes through a plain F16 GGUF first:

1. :func:`dequantize_to_f16` rewrites every tensor with ``gguf.quants.dequantize``
   into F16 (1-D tensors such as norms stay F32, as llama.cpp expects) and copies all
   key/value metadata, tokenizer included, with ``gguf.GGUFWriter``.
2. :func:`quantize_gguf` hands such a file to llama.cpp's ``llama_model_quantize``
   (through :mod:`device_runtime.llama_adapter`).

All outputs are written under a temporary name in the destination directory and
renamed into place, so an interrupted run never leaves a truncated model behind
that a later run would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import numpy as np

import gguf

from dssd_common.gguf_header import GGUFError, scan_gguf

logger = logging.getLogger(__name__)

#: Source tensor types that llama.cpp's quantizer accepts as "unquantized" input.
_FLOAT_TYPES = frozenset({gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16})
#: Integer tensors (rare, e.g. position ids) are copied verbatim, never converted.
_INT_TYPES = frozenset(
    {
        gguf.GGMLQuantizationType.I8,
        gguf.GGMLQuantizationType.I16,
        gguf.GGMLQuantizationType.I32,
        gguf.GGMLQuantizationType.I64,
    }
)
#: llama.h's LLAMA_FTYPE_MOSTLY_F16; written into general.file_type of F16 outputs.
_FTYPE_MOSTLY_F16 = 1


class RequantizeError(GGUFError):
    """Raised when a GGUF cannot be dequantized or quantized.

    A `GGUFError` so that callers catch one class for "this model file is unusable",
    whether reading its header or converting it failed.
    """


@dataclass(frozen=True)
class QuantizeReport:
    """What was produced, read back from the output file (not what was requested).

    Reading it back matters because llama.cpp picks per-tensor types itself: e.g.
    k-quants fall back to Q4_0/Q5_0 on widths that are not multiples of 256, and a
    tied embedding is kept at higher precision.
    """

    path: Path
    size_bytes: int
    file_type: int | None
    tensor_types: Mapping[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n_tensors(self) -> int:
        """Total number of tensors in the output."""
        return sum(self.tensor_types.values())


def read_report(path: str | os.PathLike[str], seconds: float = 0.0) -> QuantizeReport:
    """Build a :class:`QuantizeReport` for an existing GGUF file (header only, fast)."""
    summary = scan_gguf(path)
    return QuantizeReport(
        path=summary.path,
        size_bytes=summary.file_size,
        file_type=summary.file_type,
        tensor_types=summary.tensor_type_counts(),
        seconds=seconds,
    )


def supported_ftypes() -> dict[str, int]:
    """Map target names ("Q4_0", "Q4_K_M", "F16", "F32", ...) to llama.cpp ftype ids.

    Taken from the installed llama_cpp bindings rather than hard-coded, so the list
    always matches the quantizer that will actually run.
    """
    from device_runtime import llama_adapter  # local: loads llama.cpp's shared library (slow, optional for F16)

    return llama_adapter.ftype_ids()


def dequantize_to_f16(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    progress: bool = True,
) -> QuantizeReport:
    """Write ``dst``: ``src`` with every tensor as F16 (1-D tensors as F32).

    All key/value metadata (tokenizer, chat template, hyper-parameters, alignment) is
    copied; ``general.file_type`` is set to MOSTLY_F16 so loaders do not believe the
    file is still quantized. Tensors are converted and written one at a time, so
    peak memory is about one dequantized tensor, not the whole model.
    """
    src_p, dst_p = Path(src), Path(dst)
    start = time.perf_counter()
    reader = gguf.GGUFReader(src_p)
    arch = _read_str_field(reader, gguf.Keys.General.ARCHITECTURE)
    if arch is None:
        raise RequantizeError(f"{src_p}: no general.architecture key; not a model GGUF")
    if reader.byte_order == "S":
        # gguf.quants works on host-order blocks; a byte-swapped file would decode to garbage.
        raise RequantizeError(f"{src_p}: non-native byte order is not supported")

    with _atomic_output(dst_p) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=arch)
        try:
            _copy_metadata(reader, writer)
            writer.add_file_type(_FTYPE_MOSTLY_F16)

            plan = [(t, _f16_target_type(t)) for t in reader.tensors]
            for tensor, out_type in plan:
                shape = _numpy_shape(tensor)
                if out_type is None:  # verbatim copy
                    writer.add_tensor_info(
                        tensor.name, tensor.data.shape, tensor.data.dtype,
                        tensor.data.nbytes, tensor.tensor_type,
                    )
                else:
                    dtype = np.dtype(np.float32 if out_type == gguf.GGMLQuantizationType.F32 else np.float16)
                    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                    writer.add_tensor_info(tensor.name, shape, dtype, nbytes)

            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()

            from tqdm import tqdm

            for tensor, out_type in tqdm(
                plan, desc=f"dequantize {src_p.name}", unit="tensor", disable=not progress, leave=False
            ):
                if out_type is None:
                    data = tensor.data
                else:
                    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
                    values = values.reshape(_numpy_shape(tensor))
                    data = values.astype(np.float32 if out_type == gguf.GGMLQuantizationType.F32 else np.float16)
                writer.write_tensor_data(data)
        finally:
            writer.close()

    report = read_report(dst_p, seconds=time.perf_counter() - start)
    logger.info("wrote %s (%.1f MB, %s) in %.1fs", dst_p, report.size_bytes / 1e6,
                report.tensor_types, report.seconds)
    return report


def quantize_gguf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    ftype_name: str,
    *,
    nthread: int = 0,
    progress: bool = True,
) -> QuantizeReport:
    """Write ``dst``: ``src`` quantized to ``ftype_name`` ("Q4_0", "Q8_0", "Q4_K_M", "F16", ...).

    A source holding any quantized tensor is first dequantized to a temporary F16
    GGUF next to ``dst`` (removed afterwards), because llama.cpp only quantizes from
    float tensors. ``"F16"`` is served by :func:`dequantize_to_f16` alone. ``nthread``
    0 lets llama.cpp use all hardware threads.
    """
    src_p, dst_p = Path(src), Path(dst)
    name = ftype_name.upper().removeprefix("LLAMA_FTYPE_MOSTLY_")
    if name == "F16":
        return dequantize_to_f16(src_p, dst_p, progress=progress)

    ftypes = supported_ftypes()
    if name not in ftypes:
        raise RequantizeError(
            f"unknown ftype {ftype_name!r}; supported: {', '.join(sorted(ftypes))}"
        )
    start = time.perf_counter()
    dst_p.parent.mkdir(parents=True, exist_ok=True)

    with contextlib.ExitStack() as stack:
        float_src = src_p
        if not _is_float_only(src_p):
            fd, f16_name = tempfile.mkstemp(prefix=f".{dst_p.stem}.", suffix=".f16.gguf", dir=dst_p.parent)
            os.close(fd)
            float_src = Path(f16_name)
            stack.callback(_unlink_quietly, float_src)
            logger.info("%s is quantized; dequantizing to F16 first", src_p.name)
            dequantize_to_f16(src_p, float_src, progress=progress)

        with _atomic_output(dst_p) as tmp:
            _llama_quantize(float_src, tmp, ftypes[name], nthread=nthread)

    report = read_report(dst_p, seconds=time.perf_counter() - start)
    logger.info("wrote %s (%.1f MB, %s) in %.1fs", dst_p, report.size_bytes / 1e6,
                report.tensor_types, report.seconds)
    return report


# --------------------------------------------------------------------------- helpers


def _llama_quantize(src: Path, dst: Path, ftype: int, *, nthread: int) -> None:
    """Call ``llama_model_quantize``; llama.cpp's per-tensor chatter goes to DEBUG logs."""
    from device_runtime import llama_adapter

    logger.info("llama.cpp quantize %s -> ftype %d", src.name, ftype)
    with _llama_logs_at_debug():
        rc = llama_adapter.quantize_file(src, dst, ftype, nthread=nthread)
    if rc != 0:
        raise RequantizeError(f"llama_model_quantize({src} -> ftype {ftype}) failed with code {rc}")


@contextlib.contextmanager
def _llama_logs_at_debug() -> Iterator[None]:
    """Silence llama.cpp's stderr logging unless this module logs at DEBUG.

    llama-cpp-python routes llama.cpp's log callback through the
    ``llama-cpp-python`` logger, whose level it sets from ``verbose``; quantizing
    prints one line per tensor, which drowns the progress output at INFO.
    """
    llama_logger = logging.getLogger("llama-cpp-python")
    saved = llama_logger.level
    if not logger.isEnabledFor(logging.DEBUG):
        llama_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        llama_logger.setLevel(saved)


@contextlib.contextmanager
def _atomic_output(dst: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dst``; rename it onto ``dst`` only on success."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; model files are meant to be shared like any other output.
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    finally:
        _unlink_quietly(tmp)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _is_float_only(path: Path) -> bool:
    """True if every tensor is F32/F16/integer, i.e. llama.cpp can quantize it directly."""
    return all(t.tensor_type in _FLOAT_TYPES | _INT_TYPES for t in scan_gguf(path).tensors)


def _f16_target_type(tensor: gguf.ReaderTensor) -> gguf.GGMLQuantizationType | None:
    """Output type in the F16 file; None means copy the bytes unchanged."""
    if tensor.tensor_type in _INT_TYPES:
        return None
    if len(tensor.shape) <= 1:
        return gguf.GGMLQuantizationType.F32
    if tensor.tensor_type == gguf.GGMLQuantizationType.F16:
        return None
    return gguf.GGMLQuantizationType.F16


def _numpy_shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    """Row-major numpy shape of a tensor (GGUF stores dims innermost-first)."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    """Copy every key/value pair except those the writer owns or that change meaning.

    Skipped: the GGUF.* header pseudo-fields and general.architecture (written by
    GGUFWriter itself) and general.file_type (set by the caller). general.alignment
    is applied through ``add_custom_alignment`` so the data layout honours it too.
    """
    for fld in reader.fields.values():
        name = fld.name
        if name.startswith("GGUF.") or name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE):
            continue
        if name == gguf.Keys.General.ALIGNMENT:
            writer.add_custom_alignment(int(fld.contents()))
            continue
        vtype = fld.types[0]
        sub_type = fld.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, fld.contents(), vtype, sub_type=sub_type)


def _read_str_field(reader: gguf.GGUFReader, key: str) -> str | None:
    fld = reader.get_field(key)
    return None if fld is None else str(fld.contents())


