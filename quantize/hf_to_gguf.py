"""Hugging Face llama-family checkpoint directory -> GGUF, with the PyPI ``gguf`` writer.

Why not llama.cpp's ``convert_hf_to_gguf.py``: it ships only in llama-cpp-python's
source distribution, not in the installed package. The llama family needs little:

* tensor names through ``gguf.get_tensor_name_map`` (the table the official converter
  uses), so an unexpected tensor is an error instead of being dropped;
* the q/k row permutation for the ``llama`` architecture: HF stores rotary pairs as
  two halves (rotate_half), llama.cpp's ``llama`` graph expects them interleaved.
  Qwen2 runs with llama.cpp's NeoX rope, so its rows stay as they are;
* the tokenizer (:mod:`quantize.tokenizer_meta`).

Tensors are converted and written one at a time, so peak memory is about one tensor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .errors import ToolError
from .requantize import QuantizeReport, _atomic_output, read_report
from .tokenizer_meta import read_hf_vocab

logger = logging.getLogger(__name__)


class HfToGgufError(ToolError):
    """The checkpoint cannot be converted; the message says why."""


@dataclass(frozen=True)
class ArchSpec:
    """How one HF architecture maps onto a llama.cpp architecture."""

    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool


#: HF ``architectures[0]`` -> llama.cpp architecture. SmolLM checkpoints are LlamaForCausalLM.
SUPPORTED_ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "MistralForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "Qwen2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN2, permute_qk=False),
}

#: --outtype -> (general.file_type, chooser of each tensor's GGUF type).
OUTTYPES: dict[str, gguf.LlamaFileType] = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}

_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def convert_hf_to_gguf(
    hf_dir: str | Path,
    out: str | Path,
    outtype: str = "f16",
    *,
    tokenizer_pre: str | None = None,
    progress: bool = True,
) -> QuantizeReport:
    """Write ``out`` from the checkpoint in ``hf_dir``; returns what was written.

    Raises :class:`HfToGgufError` for unsupported architectures, rope variants,
    tokenizers or unexpected tensors, before anything is written.
    """
    src, dst = Path(hf_dir), Path(out)
    start = time.perf_counter()
    if outtype not in OUTTYPES:
        raise HfToGgufError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    if not (src / "config.json").is_file():
        raise HfToGgufError(f"{src} is not a Hugging Face model directory (no config.json)")
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    spec = _arch_spec(config)
    hp = _hyperparameters(config)
    vocab = read_hf_vocab(
        src, vocab_size=hp["vocab_size"], pre_override=tokenizer_pre,
        special_ids={"bos": _first_id(config.get("bos_token_id")), "eos": _generation_eos(src, config),
                     "pad": _first_id(config.get("pad_token_id"))},
    )

    with _open_checkpoint(src) as checkpoint:
        plan = _plan_tensors(checkpoint.names, spec, hp, OUTTYPES[outtype])
        with _atomic_output(dst) as tmp:
            writer = gguf.GGUFWriter(tmp, arch=gguf.MODEL_ARCH_NAMES[spec.gguf_arch])
            try:
                _write_hyperparameters(writer, config, hp, src)
                writer.add_file_type(int(OUTTYPES[outtype]))
                vocab.write(writer)
                for item in plan:
                    writer.add_tensor_info(item.gguf_name, item.stored_shape, item.stored_dtype,
                                           item.nbytes, raw_dtype=item.raw_dtype)
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()

                from tqdm import tqdm

                for item in tqdm(plan, desc=f"convert {src.name}", unit="tensor", disable=not progress, leave=False):
                    values = checkpoint.get(item.hf_name)
                    if item.permute_heads:
                        values = permute_rotary_rows(values, item.permute_heads)
                    writer.write_tensor_data(item.encode(values))
            finally:
                writer.close()

    report = read_report(dst, seconds=time.perf_counter() - start)
    logger.info("wrote %s (%.1f MB, %s) in %.1fs", dst, report.size_bytes / 1e6, report.tensor_types, report.seconds)
    return report


def permute_rotary_rows(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from HF's two-halves rope layout to llama.cpp's interleaved one.

    Row ``j`` of the first half and row ``j`` of the second half of a head become rows
    ``2j`` and ``2j + 1``; the same permutation llama.cpp's converter applies (and
    transformers undoes when it loads a llama GGUF). Works for weights and biases.
    """
    rows = weights.shape[0]
    if rows % (2 * n_heads):
        raise HfToGgufError(f"cannot permute {rows} rows into {n_heads} rotary heads")
    return (
        weights.reshape(n_heads, 2, rows // n_heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


# --------------------------------------------------------------------------- config


def _arch_spec(config: dict[str, Any]) -> ArchSpec:
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise HfToGgufError(
            f"architecture {arch or config.get('model_type')!r} is not supported; hf-to-gguf converts "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (SmolLM is LlamaForCausalLM)"
        )
    if config.get("mlp_bias"):
        raise HfToGgufError("mlp_bias=true is not supported by llama.cpp's llama graph")
    return SUPPORTED_ARCHITECTURES[arch]


def _hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """The numbers the GGUF header and the tensor plan need, with HF's defaults filled in."""
    try:
        hidden = int(config["hidden_size"])
        n_heads = int(config["num_attention_heads"])
        hp = {
            "hidden": hidden,
            "n_layers": int(config["num_hidden_layers"]),
            "n_heads": n_heads,
            "n_kv_heads": int(config.get("num_key_value_heads") or n_heads),
            "ffn": int(config["intermediate_size"]),
            "vocab_size": int(config["vocab_size"]),
            "head_dim": int(config.get("head_dim") or hidden // n_heads),
            "context": int(config.get("max_position_embeddings", 2048)),
            "rms_eps": float(config.get("rms_norm_eps", 1e-6)),
            "tied": bool(config.get("tie_word_embeddings", False)),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise HfToGgufError(f"config.json lacks or garbles a required field ({exc})") from exc
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    hp["rope_theta"] = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise HfToGgufError(f"rope type {rope_type!r} is not supported (only default and linear scaling)")
    hp["rope_linear_factor"] = float(rope["factor"]) if rope_type == "linear" else None
    window = config.get("sliding_window")
    if window and config.get("use_sliding_window", True) and int(window) < hp["context"]:
        logger.warning("sliding_window=%s is not represented in the GGUF: llama.cpp attends to the "
                       "full context, which matches the model only up to %s tokens", window, window)
    return hp


def _write_hyperparameters(writer: gguf.GGUFWriter, config: dict[str, Any], hp: dict[str, Any], src: Path) -> None:
    writer.add_name(str(config.get("_name_or_path") or src.name))
    writer.add_vocab_size(hp["vocab_size"])
    writer.add_context_length(hp["context"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(hp["n_layers"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_head_count(hp["n_heads"])
    writer.add_head_count_kv(hp["n_kv_heads"])
    writer.add_rope_dimension_count(hp["head_dim"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_layer_norm_rms_eps(hp["rms_eps"])
    if hp["head_dim"] * hp["n_heads"] != hp["hidden"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    if hp["rope_linear_factor"] is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(hp["rope_linear_factor"])


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None else int(value)


def _generation_eos(src: Path, config: dict[str, Any]) -> int | None:
    """The end-of-turn token chat models stop on lives in generation_config.json when present."""
    gen = src / "generation_config.json"
    if gen.is_file():
        eos = _first_id(json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id"))
        if eos is not None:
            return eos
    return _first_id(config.get("eos_token_id"))


# --------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class _TensorPlan:
    """One output tensor: where it comes from and how it is stored."""

    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]  # numpy (row-major) shape
    qtype: gguf.GGMLQuantizationType
    permute_heads: int  # 0: no rotary permutation

    @property
    def stored_shape(self) -> tuple[int, ...]:
        if self.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            return self.shape
        return gguf.quants.quant_shape_to_byte_shape(self.shape, self.qtype)

    @property
    def stored_dtype(self) -> np.dtype:
        return np.dtype({gguf.GGMLQuantizationType.F32: np.float32,
                         gguf.GGMLQuantizationType.F16: np.float16}.get(self.qtype, np.uint8))

    @property
    def raw_dtype(self) -> gguf.GGMLQuantizationType | None:
        return None if self.stored_dtype != np.uint8 else self.qtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.stored_shape, dtype=np.int64)) * self.stored_dtype.itemsize

    def encode(self, values: np.ndarray) -> np.ndarray:
        """The bytes to write, as an array whose nbytes equals :attr:`nbytes`."""
        if self.stored_dtype != np.uint8:
            return np.ascontiguousarray(values, dtype=self.stored_dtype)
        return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), self.qtype)


def _tensor_type(shape: tuple[int, ...], file_type: gguf.LlamaFileType) -> gguf.GGMLQuantizationType:
    """Norms and other vectors stay F32 (llama.cpp expects it); matrices follow --outtype."""
    if len(shape) < 2 or file_type == gguf.LlamaFileType.ALL_F32:
        return gguf.GGMLQuantizationType.F32
    if file_type == gguf.LlamaFileType.MOSTLY_Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def _plan_tensors(
    names: dict[str, tuple[int, ...]], spec: ArchSpec, hp: dict[str, Any], file_type: gguf.LlamaFileType
) -> list[_TensorPlan]:
    name_map = gguf.get_tensor_name_map(spec.gguf_arch, hp["n_layers"])
    plan: list[_TensorPlan] = []
    for hf_name, shape in names.items():
        if hf_name.endswith(_SKIPPED_SUFFIXES):
            continue
        if hf_name == "lm_head.weight" and hp["tied"]:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise HfToGgufError(f"unexpected tensor {hf_name!r}: not part of a plain "
                                f"{gguf.MODEL_ARCH_NAMES[spec.gguf_arch]} model")
        heads = 0
        if spec.permute_qk and ".q_proj." in hf_name:
            heads = hp["n_heads"]
        elif spec.permute_qk and ".k_proj." in hf_name:
            heads = hp["n_kv_heads"]
        plan.append(_TensorPlan(hf_name, gguf_name, shape, _tensor_type(shape, file_type), heads))
    if not any(p.gguf_name == "token_embd.weight" for p in plan):
        raise HfToGgufError("the checkpoint has no token embedding (model.embed_tokens.weight)")
    if not hp["tied"] and not any(p.gguf_name == "output.weight" for p in plan):
        raise HfToGgufError("tie_word_embeddings is false but the checkpoint has no lm_head.weight")
    return plan


@dataclass
class _Checkpoint:
    """Tensor names with shapes, and a loader that returns one tensor as float32 numpy."""

    names: dict[str, tuple[int, ...]]
    get: Callable[[str], np.ndarray]


@contextlib.contextmanager
def _open_checkpoint(src: Path) -> Iterator[_Checkpoint]:
    """Open safetensors shards lazily (bf16 included, via torch); else pytorch_model*.bin."""
    import torch

    files = sorted(src.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        with contextlib.ExitStack() as stack:
            handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in files}
            where: dict[str, Any] = {}
            names: dict[str, tuple[int, ...]] = {}
            for handle in handles.values():
                for key in handle.keys():
                    where[key] = handle
                    names[key] = tuple(handle.get_slice(key).get_shape())
            yield _Checkpoint(names, lambda key: where[key].get_tensor(key).to(torch.float32).numpy())
        return
    bins = sorted(src.glob("pytorch_model*.bin"))
    if not bins:
        raise HfToGgufError(f"{src} has no *.safetensors or pytorch_model*.bin weights")
    state: dict[str, Any] = {}
    for f in bins:
        state.update(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
    yield _Checkpoint({k: tuple(v.shape) for k, v in state.items()},
                      lambda key: state[key].to(torch.float32).numpy())
