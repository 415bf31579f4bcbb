"""PyTorch/transformers target backend: an HF directory or a GGUF file as the target model.

A GGUF is loaded with `gguf_file=` (transformers dequantizes it), so the edge can verify
with the full-precision version of the very file the device quantized from.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from edge_service.backends.base import TargetModel, TargetSequence

log = logging.getLogger(__name__)

_DTYPES = ("float32", "float16", "bfloat16")


def read_vocab_tokens(path: Path) -> list[str]:
    """Token strings in id order, as the device's llama.cpp sees them."""
    if path.suffix == ".gguf":
        from quantize.requantize import read_token_strings

        return read_token_strings(path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    return tok.convert_ids_to_tokens(list(range(len(tok))))


class TorchTargetModel(TargetModel):
    """Weights loaded once with transformers; each session gets its own DynamicCache."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        threads: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        path = Path(model_path)
        if not path.exists():
            raise FileNotFoundError(f"target model not found: {path}")
        if threads:
            torch.set_num_threads(threads)
        kwargs: dict = {"dtype": getattr(torch, dtype)}
        if path.is_file():
            if path.suffix != ".gguf":
                raise ValueError(f"{path} is a file but not a .gguf; pass a GGUF or an HF directory")
            kwargs["gguf_file"] = path.name
            load_from = str(path.parent)
        else:
            load_from = str(path)
        log.info("loading target %s (%s on %s)", path, dtype, device)
        self._torch = torch
        self._device = torch.device(device)
        self._model = AutoModelForCausalLM.from_pretrained(load_from, **kwargs).to(self._device)
        self._model.eval()
        config = self._model.config
        self.n_vocab = int(config.vocab_size)
        self.max_context = int(getattr(config, "max_position_embeddings", 2048))
        self.vocab_tokens = read_vocab_tokens(path)
        eos = self._model.generation_config.eos_token_id
        if eos is None:
            eos = config.eos_token_id
        self.eos_token_ids = tuple(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
        self.name = path.name

    @property
    def model(self):  # noqa: ANN201 - the transformers model, for reference tests
        return self._model

    def new_sequence(self) -> "TorchSequence":
        return TorchSequence(self)

    def forward(self, cache: object, new_ids: Sequence[int]) -> np.ndarray:
        torch = self._torch
        ids = torch.tensor([list(new_ids)], dtype=torch.long, device=self._device)
        with torch.inference_mode():
            out = self._model(input_ids=ids, cache=cache, use_cache=True)
        return out.logits[0].float().cpu().numpy()


class TorchSequence(TargetSequence):
    def __init__(self, model: TorchTargetModel) -> None:
        from transformers import DynamicCache

        self._model = model
        self._cache = DynamicCache(config=model.model.config)
        self._n = 0

    @property
    def n_cached(self) -> int:
        return self._n

    def forward(self, new_ids: Sequence[int]) -> np.ndarray:
        if not len(new_ids):
            raise ValueError("forward needs at least one token")
        if self._n + len(new_ids) > self._model.max_context:
            raise ValueError(f"sequence would exceed the model context of {self._model.max_context}")
        logits = self._model.forward(self._cache, new_ids)
        self._n += len(new_ids)
        return logits

    def rollback(self, n_keep: int) -> None:
        if not 0 <= n_keep <= self._n:
            raise ValueError(f"cannot roll back to {n_keep} of {self._n} cached tokens")
        if n_keep < self._n:
            self._cache.crop(n_keep - self._n)  # transformers 5 takes minus the tokens to drop
            self._n = n_keep

    def release(self) -> None:
        self._cache = None  # type: ignore[assignment]
        self._n = 0
