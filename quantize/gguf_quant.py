"""``python -m quantize gguf``: GGUF -> GGUF at a chosen llama.cpp type, with an honest report.

Why a report beyond the file: llama.cpp decides each tensor's type itself. K-quants
(Q4_K_M, Q5_K_M, Q6_K, ...) and i-quants work on super-blocks of 256 values, so a
tensor whose row width is not a multiple of 256 silently falls back to a legacy type
(Q4_0/Q5_0/Q8_0...). SmolLM2's width 576 makes every "Q4_K_M" mostly Q5_0 -- a user
comparing drafts must know that. The conversion itself is
:func:`quantize.requantize.quantize_gguf` (dequantizing a quantized source first).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from .errors import ToolError
from dssd_common.gguf_header import scan_gguf

from .requantize import QuantizeReport, quantize_gguf

logger = logging.getLogger(__name__)

#: Values per super-block of k-quants and i-quants.
SUPER_BLOCK = 256


class GgufQuantError(ToolError):
    """The requested re-quantization cannot run (bad paths or type)."""


@dataclass(frozen=True)
class Fallback:
    """Tensors that did not get the requested super-block type because of their width."""

    n_tensors: int
    widths: tuple[int, ...]
    used_types: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        used = ", ".join(f"{t} x{n}" for t, n in sorted(self.used_types.items()))
        widths = ", ".join(str(w) for w in self.widths)
        return (f"{self.n_tensors} tensors have row widths ({widths}) that are not multiples of "
                f"{SUPER_BLOCK}; llama.cpp used {used} for them instead")


@dataclass(frozen=True)
class RetypeResult:
    """The written file's report plus the k-quant fallback, if any."""

    report: QuantizeReport
    fallback: Fallback | None


def needs_super_blocks(type_name: str) -> bool:
    """True for llama.cpp types built on 256-value super-blocks (Q*_K*, IQ*, TQ*)."""
    name = type_name.upper()
    return "_K" in name or name.startswith(("IQ", "TQ"))


def requantize(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    type_name: str,
    *,
    nthread: int = 0,
    progress: bool = True,
) -> RetypeResult:
    """Quantize ``src`` to ``type_name`` at ``dst`` and describe what llama.cpp really did."""
    src_p, dst_p = Path(src), Path(dst)
    if not src_p.is_file():
        raise GgufQuantError(f"source GGUF not found: {src_p}")
    if dst_p.exists() and dst_p.resolve() == src_p.resolve():
        raise GgufQuantError("destination is the source file; choose another output path")
    report = quantize_gguf(src_p, dst_p, type_name, nthread=nthread, progress=progress)
    fallback = find_fallback(dst_p) if needs_super_blocks(type_name) else None
    if fallback is not None:
        logger.warning("%s", fallback.describe())
    return RetypeResult(report, fallback)


def find_fallback(path: Path) -> Fallback | None:
    """Matrices of ``path`` whose width rules out super-block types, with the types they got."""
    used: Counter[str] = Counter()
    widths: set[int] = set()
    for t in scan_gguf(path).tensors:
        if len(t.shape) < 2 or t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            continue
        width = int(t.shape[0])  # GGUF shapes are innermost-first: shape[0] is the row width
        if width % SUPER_BLOCK:
            used[t.tensor_type.name] += 1
            widths.add(width)
    if not used:
        return None
    return Fallback(sum(used.values()), tuple(sorted(widths)), dict(used))
