"""A fast GGUF header reader: metadata and tensor infos, never tensor data.

Why it lives below the runtimes: the edge reads the draft's vocabulary from a GGUF (to
fingerprint it against the device's), benchmarks read vocabulary sizes, and the model
tools check derived files; none of them should import model preparation for that.
"""
from __future__ import annotations

import mmap
import os
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf


class GGUFError(RuntimeError):
    """A file is not a readable GGUF, or lacks what was asked of it."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's header entry; ``shape`` in GGUF order (innermost dimension first)."""

    name: str
    shape: tuple[int, ...]
    tensor_type: gguf.GGMLQuantizationType
    offset: int  # relative to the start of the data section
    n_bytes: int


@dataclass(frozen=True)
class GGUFSummary:
    """Header of a GGUF file: scalar/string metadata and tensor infos, no tensor data.

    Why not ``gguf.GGUFReader``: it materialises a numpy view per array element, which
    takes ~7 s on SmolLM2's 98k tokenizer strings; this scan takes milliseconds, so
    "is the derived file already there and complete?" stays cheap.
    """

    path: Path
    version: int
    metadata: Mapping[str, Any]  # array-valued keys map to their length only
    tensors: tuple[GGUFTensorInfo, ...]
    data_start: int
    file_size: int

    @property
    def file_type(self) -> int | None:
        value = self.metadata.get(gguf.Keys.General.FILE_TYPE)
        return None if value is None else int(value)

    @property
    def data_end(self) -> int:
        """Byte just past the last tensor's data; > ``file_size`` means truncated."""
        return self.data_start + max((t.offset + t.n_bytes for t in self.tensors), default=0)

    @property
    def complete(self) -> bool:
        return self.data_end <= self.file_size

    def tensor_type_counts(self) -> dict[str, int]:
        counts = Counter(t.tensor_type.name for t in self.tensors)
        return dict(sorted(counts.items()))


_SCALAR_FORMATS: dict[gguf.GGUFValueType, str] = {
    gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H", gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q", gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}


def scan_gguf(path: str | os.PathLike[str], string_arrays: frozenset[str] = frozenset()) -> GGUFSummary:
    """Parse a little-endian GGUF (v2/v3) header without touching tensor data.

    Array-valued keys map to their length, except those named in `string_arrays`,
    which are read in full (e.g. the tokenizer's token list; scalar arrays such as the
    token types too).

    Raises :class:`GGUFError` if the file is not a GGUF or its header is cut off.
    """
    p = Path(path)
    try:
        with open(p, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _scan(p, buf, string_arrays)
    except (struct.error, ValueError, KeyError, UnicodeDecodeError) as exc:
        raise GGUFError(f"{p}: malformed or truncated GGUF header ({exc})") from exc


def _scan(path: Path, buf: mmap.mmap, string_arrays: frozenset[str]) -> GGUFSummary:
    pos = 0

    def unpack(fmt: str) -> Any:
        nonlocal pos
        (value,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return value

    def read_str() -> str:
        nonlocal pos
        n = unpack("<Q")
        if pos + n > len(buf):
            raise ValueError("string runs past end of file")
        text = bytes(buf[pos : pos + n]).decode("utf-8")
        pos += n
        return text

    def skip_value(vtype: gguf.GGUFValueType) -> None:
        nonlocal pos
        if vtype == gguf.GGUFValueType.STRING:
            pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
        elif vtype == gguf.GGUFValueType.ARRAY:
            sub = gguf.GGUFValueType(unpack("<I"))
            count = unpack("<Q")
            if sub in _SCALAR_FORMATS:
                pos += count * struct.calcsize(_SCALAR_FORMATS[sub])
            else:
                for _ in range(count):
                    skip_value(sub)
        else:
            pos += struct.calcsize(_SCALAR_FORMATS[vtype])

    if unpack("<I") != gguf.GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (bad magic)")
    version = unpack("<I")
    if version not in (2, 3):
        raise GGUFError(f"{path}: unsupported GGUF version {version} (or big-endian file)")
    n_tensors, n_kv = unpack("<Q"), unpack("<Q")

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = read_str()
        vtype = gguf.GGUFValueType(unpack("<I"))
        if vtype == gguf.GGUFValueType.STRING:
            metadata[key] = read_str()
        elif vtype == gguf.GGUFValueType.ARRAY and key in string_arrays:
            sub = gguf.GGUFValueType(unpack("<I"))
            count = unpack("<Q")
            if sub in _SCALAR_FORMATS:  # e.g. tokenizer.ggml.token_type
                fmt = "<%d%s" % (count, _SCALAR_FORMATS[sub][-1])
                metadata[key] = list(struct.unpack_from(fmt, buf, pos))
                pos += struct.calcsize(fmt)
            elif sub != gguf.GGUFValueType.STRING:
                raise ValueError(f"{key} is not an array of strings or scalars")
            else:
                metadata[key] = [read_str() for _ in range(count)]
        elif vtype == gguf.GGUFValueType.ARRAY:
            count = struct.unpack_from("<Q", buf, pos + 4)[0]
            skip_value(vtype)
            metadata[key] = count
        else:
            metadata[key] = unpack(_SCALAR_FORMATS[vtype])

    tensors: list[GGUFTensorInfo] = []
    for _ in range(n_tensors):
        name = read_str()
        n_dims = unpack("<I")
        shape = tuple(unpack("<Q") for _ in range(n_dims))
        ttype = gguf.GGMLQuantizationType(unpack("<I"))
        offset = unpack("<Q")
        block, type_size = gguf.GGML_QUANT_SIZES[ttype]
        n_elements = 1
        for d in shape:
            n_elements *= d
        tensors.append(GGUFTensorInfo(name, shape, ttype, offset, n_elements // block * type_size))

    alignment = int(metadata.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT))
    data_start = (pos + alignment - 1) // alignment * alignment
    return GGUFSummary(path, version, metadata, tuple(tensors), data_start, len(buf))


def read_token_strings(path: str | os.PathLike[str]) -> list[str]:
    """The vocabulary (tokenizer.ggml.tokens) in id order; ~100x faster than GGUFReader."""
    key = "tokenizer.ggml.tokens"
    tokens = scan_gguf(path, frozenset({key})).metadata.get(key)
    if not isinstance(tokens, list):
        raise GGUFError(f"{path} has no {key}: cannot read its vocabulary")
    return tokens
