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
        from transformers import DynamicCache

        # layers of a fresh cache (0 when transformers builds them lazily: no batching then)
        self._n_cache_layers = len(DynamicCache(config=self._model.config).layers)

    @property
    def model(self):  # noqa: ANN201 - the transformers model, for reference tests
        return self._model

    def new_sequence(self) -> "TorchSequence":
        return TorchSequence(self)

    def forward_rows(self, cache: object, new_ids: Sequence[int], keep: int) -> "torch.Tensor":  # noqa: F821
        """Run `new_ids` through the model on `cache`; the logits of the last `keep`
        positions as a tensor in the model's dtype, on the model's device."""
        torch = self._torch
        ids = torch.tensor([list(new_ids)], dtype=torch.long, device=self._device)
        with torch.inference_mode():
            # transformers reads logits_to_keep = 0 as "all": a prefill (keep 0) projects
            # the last position only, and drops it
            out = self._model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=max(keep, 1))
        return out.logits[0, out.logits.shape[1] - keep :]

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

        Each session's KV cache is copied, left-padded to the longest, into one batch
        cache; the new ids are right-padded to the longest. A 2-D attention mask hides the
        padding and explicit position ids keep every token at its own sequence position
        (cached keys carry their rotary positions already, so only relative order inside
        the batch cache matters). After the forward, each session's new KV entries are
        appended to its own cache. Logits equal the per-sequence forward to float
        rounding (~1e-5). Caches that are not plain full-attention `DynamicLayer`s (e.g.
        sliding-window layers) fall back to one forward per sequence.
        """
        seqs = list(sequences)
        lists = [[int(t) for t in ids] for ids in new_ids]
        if len(seqs) != len(lists):
            raise ValueError(f"{len(seqs)} sequences but {len(lists)} id lists")
        counts = [keep_rows(k, len(ids)) for k, ids in zip(keep_list(keep, len(lists)), lists)]
        if len({id(s) for s in seqs}) != len(seqs):
            raise ValueError("forward_batch needs distinct sequences")
        torch = self._torch
        if len(seqs) <= 1 or not all(isinstance(s, TorchSequence) and s._batchable(self) for s in seqs):
            for seq in seqs:
                if not isinstance(seq, TorchSequence):
                    raise ValueError("forward_batch_rows needs sequences of this torch model")
            parts = [seq._forward_rows(ids, k) for seq, ids, k in zip(seqs, lists, counts)]
            return torch.cat(parts) if parts else torch.empty((0, self.n_vocab)), counts
        for seq, ids in zip(seqs, lists):
            seq._check_forward(ids)
        from transformers import DynamicCache

        n_batch = len(seqs)
        past = [s.n_cached for s in seqs]
        n_new = [len(ids) for ids in lists]
        p_max, n_max = max(past), max(n_new)
        dev = self._device
        input_ids = torch.zeros((n_batch, n_max), dtype=torch.long)
        mask = torch.zeros((n_batch, p_max + n_max), dtype=torch.long)
        positions = torch.zeros((n_batch, n_max), dtype=torch.long)
        kept = torch.zeros((n_batch, n_max), dtype=torch.bool)  # positions whose logits are returned
        for i, (ids, p, n, k) in enumerate(zip(lists, past, n_new, counts)):
            input_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
            mask[i, p_max - p : p_max + n] = 1
            kept[i, n - k : n] = True
            # padding queries continue the positions: harmless, their rows are discarded
            positions[i] = torch.arange(p, p + n_max)
        batch = DynamicCache(config=self._model.config)
        if p_max:
            for layer_idx, layer in enumerate(batch.layers):
                src = [s._cache.layers[layer_idx] for s in seqs]
                ref = next(lay for lay, p in zip(src, past) if p)
                _, n_heads, _, head_dim = ref.keys.shape
                keys = ref.keys.new_zeros((n_batch, n_heads, p_max, head_dim))
                values = ref.values.new_zeros((n_batch, ref.values.shape[1], p_max, ref.values.shape[3]))
                for i, (lay, p) in enumerate(zip(src, past)):
                    if p:
                        keys[i, :, p_max - p :] = lay.keys[0]
                        values[i, :, p_max - p :] = lay.values[0]
                layer.update(keys, values)
        with torch.inference_mode():
            out = self._model(
                input_ids=input_ids.to(dev),
                attention_mask=mask.to(dev),
                position_ids=positions.to(dev),
                cache=batch,
                use_cache=True,
                logits_to_keep=kept.to(dev),  # a boolean mask: the kept rows, flattened in order
            )
            for i, (seq, n) in enumerate(zip(seqs, n_new)):
                for layer_idx, layer in enumerate(batch.layers):
                    seq._cache.layers[layer_idx].update(
                        layer.keys[i : i + 1, :, p_max : p_max + n], layer.values[i : i + 1, :, p_max : p_max + n]
                    )
                seq._n += n
        return out.logits.reshape(-1, out.logits.shape[-1]), counts


class TorchSequence(TargetSequence):
    """One session's DynamicCache.

    Sliding-window layers (Gemma-3) keep only `sliding_window - 1` past tokens, and
    transformers refuses to crop one that is past its window unless it records its past.
    So they record it, are cut back to the window before each forward (`_restrict`), and a
    rollback may go back to the start of the last forward (`_floor`), which covers every
    rejected draft; `can_rollback` says when an older prefix needs a fresh sequence.
    """

    def __init__(self, model: TorchTargetModel) -> None:
        from transformers import DynamicCache

        self._model = model
        self._cache = DynamicCache(config=model.model.config)
        self._sliding = [layer for layer in self._cache.layers if getattr(layer, "is_sliding", False)]
        for layer in self._sliding:
            layer.activate_past_recording()
        #: smallest window of the sliding layers (None: full attention only)
        self._window = min((layer.sliding_window for layer in self._sliding), default=None)
        self._floor = 0  # rollback cannot go below this many tokens
        self._n = 0

    @property
    def n_cached(self) -> int:
        return self._n

    def _check_forward(self, new_ids: Sequence[int]) -> None:
        if self._cache is None:
            raise ValueError("this sequence was released")
        if not len(new_ids):
            raise ValueError("forward needs at least one token")
        if self._n + len(new_ids) > self._model.max_context:
            raise ValueError(f"sequence would exceed the model context of {self._model.max_context}")

    def _batchable(self, model: TorchTargetModel) -> bool:
        """Whether `model.forward_batch` can stack this cache: same model, full-attention layers only."""
        from transformers.cache_utils import DynamicLayer

        return (
            self._model is model
            and self._cache is not None
            and len(self._cache.layers) == model._n_cache_layers > 0
            and all(type(layer) is DynamicLayer for layer in self._cache.layers)
        )

    def forward(self, new_ids: Sequence[int], keep: int | None = None) -> np.ndarray:
        return self._forward_rows(new_ids, keep_rows(keep, len(new_ids))).float().cpu().numpy()

    def _forward_rows(self, new_ids: Sequence[int], keep: int) -> "torch.Tensor":  # noqa: F821
        """`forward` leaving the kept logits rows as a tensor where the model computed them."""
        self._check_forward(new_ids)
        self._restrict()
        rows = self._model.forward_rows(self._cache, new_ids, keep)
        before, self._n = self._n, self._n + len(new_ids)
        self._floor = before if self._past_window(self._n) else 0
        return rows

    def _past_window(self, n: int) -> bool:
        return self._window is not None and n >= self._window

    def _restrict(self) -> None:
        """Cut recorded sliding layers back to their window (what the next forward's mask expects)."""
        for layer in self._sliding:
            if layer.get_seq_length() >= layer.sliding_window:
                layer.crop(0)

    def can_rollback(self, n_keep: int) -> bool:
        return self._floor <= n_keep <= self._n

    def rollback(self, n_keep: int) -> None:
        if not 0 <= n_keep <= self._n:
            raise ValueError(f"cannot roll back to {n_keep} of {self._n} cached tokens")
        if not self.can_rollback(n_keep):
            raise ValueError(f"cannot roll back to {n_keep} of {self._n} cached tokens: the sliding-window "
                             f"layers hold only the tokens from {self._floor} on (start a new sequence)")
        if n_keep < self._n:
            self._cache.crop(n_keep - self._n)  # transformers 5 takes minus the tokens to drop
            self._n = n_keep
            self._floor = n_keep if self._past_window(n_keep) else 0

    def release(self) -> None:
        self._cache = None  # type: ignore[assignment]
        self._n = 0
