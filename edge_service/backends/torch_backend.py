"""PyTorch/transformers target backend: an HF directory or a GGUF file as the target model.

A GGUF is loaded with `gguf_file=` (transformers dequantizes it), so the edge can verify
with the full-precision version of the very file the device quantized from.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from edge_service.backends.base import TargetModel, TargetSequence, keep_list, keep_rows

log = logging.getLogger(__name__)

_DTYPES = ("float32", "float16", "bfloat16")


def read_vocab_tokens(path: Path) -> list[str]:
    """Token strings in id order, as the device's llama.cpp sees them."""
    if path.suffix == ".gguf":
        from dssd_common.gguf_header import read_token_strings

        return read_token_strings(path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    return tok.convert_ids_to_tokens(list(range(len(tok))))


class TorchTargetModel(TargetModel):
    """Weights loaded once with transformers; each session's KV lives in a slot of one
    `edge_service.kv_slots.KVPool` (in place, under an optional memory budget)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        threads: int | None = None,
        kv_budget_mb: float | None = None,
    ) -> None:
        """`kv_budget_mb`: bytes of KV all sessions may reserve together (None: no limit)."""
        import torch
        from transformers import AutoModelForCausalLM

        from edge_service.kv_slots import ATTENTION, KVPool, register_attention

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        if kv_budget_mb is not None and kv_budget_mb <= 0:
            raise ValueError(f"kv_budget_mb must be > 0, got {kv_budget_mb}")
        path = Path(model_path)
        if not path.exists():
            raise FileNotFoundError(f"target model not found: {path}")
        if threads:
            torch.set_num_threads(threads)
        register_attention()
        kwargs: dict = {"dtype": getattr(torch, dtype), "attn_implementation": ATTENTION}
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
        text = config.get_text_config()
        n_heads = int(text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or int(text.hidden_size) // n_heads
        self.kv_pool = KVPool(
            n_layers=int(text.num_hidden_layers),
            kv_heads=int(getattr(text, "num_key_value_heads", None) or n_heads),
            head_dim=int(head_dim),
            dtype=getattr(torch, dtype),
            device=self._device,
            max_tokens=self.max_context,
            budget_bytes=None if kv_budget_mb is None else int(kv_budget_mb * 2**20),
        )
        # a prepared 4-D mask makes transformers skip building one: the slot attention
        # builds each session's own (the content of this one is never read)
        self._no_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=self._device)

    @property
    def model(self):  # noqa: ANN201 - the transformers model, for reference tests
        return self._model

    def new_sequence(self) -> "TorchSequence":
        return TorchSequence(self)

    def forward_batch(
        self,
        sequences: Sequence[TargetSequence],
        new_ids: Sequence[Sequence[int]],
        keep: Sequence[int | None] | None = None,
    ) -> list[np.ndarray]:
        """One batched forward for several sessions' sequences (see `TargetModel.forward_batch`)."""
        rows, counts = self.forward_batch_rows(sequences, new_ids, keep)
        logits = rows.float().cpu().numpy()
        bounds = np.cumsum([0, *counts])
        return [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def forward_batch_rows(
        self,
        sequences: Sequence[TargetSequence],
        new_ids: Sequence[Sequence[int]],
        keep: Sequence[int | None] | None = None,
    ) -> tuple["torch.Tensor", list[int]]:  # noqa: F821 - torch is imported lazily
        """`forward_batch`, with the kept logits rows of all sequences left where the model
        computed them: one (sum of kept rows, V) tensor in the model's dtype and device,
        sequence after sequence, and the row count of each.

        This is what verification on the logits' device consumes; only the model's
        hidden states of the kept positions go through the lm_head.

        The new ids of all sequences are packed into one row (no padding), each token
        with its own position id; the slot attention (`edge_service.kv_slots`) writes
        their keys and values into each sequence's slot in place and attends each
        sequence over its own slot. Nothing else of any cache is copied. Logits equal a
        per-sequence forward to float rounding (~1e-5 in fp32). A single sequence is a
        batch of one, on the same path.
        """
        seqs = list(sequences)
        lists = [[int(t) for t in ids] for ids in new_ids]
        if len(seqs) != len(lists):
            raise ValueError(f"{len(seqs)} sequences but {len(lists)} id lists")
        counts = [keep_rows(k, len(ids)) for k, ids in zip(keep_list(keep, len(lists)), lists)]
        if len({id(s) for s in seqs}) != len(seqs):
            raise ValueError("forward_batch needs distinct sequences")
        for seq, ids in zip(seqs, lists):
            if not isinstance(seq, TorchSequence) or seq.owner is not self:
                raise ValueError("forward_batch_rows needs sequences of this torch model")
            seq._check_forward(ids)
        torch = self._torch
        if not seqs:
            return torch.empty((0, self.n_vocab)), counts
        from edge_service.kv_slots import PLAN_KWARG

        plan = self.kv_pool.plan([s._slot for s in seqs], [len(ids) for ids in lists])  # type: ignore[union-attr]
        flat: list[int] = []
        positions: list[int] = []
        kept: list[int] = []
        for seg, ids, k in zip(plan.segments, lists, counts):
            flat.extend(ids)
            positions.extend(range(seg.past, seg.past + seg.n))
            kept.extend(range(seg.start + seg.n - k, seg.start + seg.n))
        dev = self._device
        with torch.inference_mode():
            out = self._model(
                input_ids=torch.tensor([flat], dtype=torch.long, device=dev),
                position_ids=torch.tensor([positions], dtype=torch.long, device=dev),
                attention_mask=self._no_mask,
                use_cache=False,
                logits_to_keep=torch.tensor(kept, dtype=torch.long, device=dev),
                **{PLAN_KWARG: plan},
            )
        self.kv_pool.commit(plan)
        return out.logits[0], counts


class TorchSequence(TargetSequence):
    """One session's KV slot in the model's pool."""

    def __init__(self, model: TorchTargetModel) -> None:
        self._model = model
        self._slot = model.kv_pool.new_slot()

    @property
    def owner(self) -> "TorchTargetModel":
        """The model whose KV pool holds this sequence's slot (batches check it)."""
        return self._model

    @property
    def n_cached(self) -> int:
        return 0 if self._slot is None else self._slot.length

    def _check_forward(self, new_ids: Sequence[int]) -> None:
        if self._slot is None:
            raise ValueError("this sequence was released")
        if not len(new_ids):
            raise ValueError("forward needs at least one token")
        if self._slot.length + len(new_ids) > self._model.max_context:
            raise ValueError(f"sequence would exceed the model context of {self._model.max_context}")

    def forward(self, new_ids: Sequence[int], keep: int | None = None) -> np.ndarray:
        return self._forward_rows(new_ids, keep_rows(keep, len(new_ids))).float().cpu().numpy()

    def _forward_rows(self, new_ids: Sequence[int], keep: int) -> "torch.Tensor":  # noqa: F821
        """`forward` leaving the kept logits rows as a tensor where the model computed them."""
        rows, _ = self._model.forward_batch_rows([self], [new_ids], [keep])
        return rows

    def rollback(self, n_keep: int) -> None:
        n = self.n_cached
        if not 0 <= n_keep <= n:
            raise ValueError(f"cannot roll back to {n_keep} of {n} cached tokens")
        if self._slot is not None:
            self._slot.length = n_keep  # the rows beyond are overwritten by the next forward

    def reserve(self, n_tokens: int) -> None:
        if self._slot is None:
            raise ValueError("this sequence was released")
        self._slot.ensure(min(n_tokens, self._model.max_context), exact=True)

    def idle(self) -> None:
        if self._slot is not None:
            self._slot.idle = True

    def release(self) -> None:
        if self._slot is not None:
            self._model.kv_pool.release(self._slot)
        self._slot = None  # type: ignore[assignment]
