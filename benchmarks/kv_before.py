"""The batched forward as it was before the KV slots (edge_service/kv_slots.py).

Kept for one use: the "before" of `python -m benchmarks kv`. Each session held its own
transformers `DynamicCache`; a batched forward copied every session's whole cache,
left-padded to the longest, into a fresh batch cache, ran the padded batch, then
appended each session's new rows back to its own cache: O(sum of contexts) of memory
traffic per round, twice the KV at peak. Full-attention `DynamicLayer`s only. It runs
on the same loaded model as the slots (whose attention is transformers' sdpa when no
slot plan is passed).
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers import DynamicCache


class RepackSequence:
    """One session's `DynamicCache`, as `TorchSequence` held it before the slots."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.n = 0

    def prefill(self, ids: Sequence[int]) -> None:
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([list(ids)]), cache=self.cache, use_cache=True, logits_to_keep=1)
        self.n += len(ids)

    def rollback(self, n_keep: int) -> None:
        if n_keep < self.n:
            self.cache.crop(n_keep - self.n)
            self.n = n_keep


def repack_forward(model: torch.nn.Module, seqs: Sequence[RepackSequence], new_ids: Sequence[Sequence[int]],
                   keep: Sequence[int]) -> torch.Tensor:
    """The old `forward_batch_rows`: the kept logits rows of all sequences, in order."""
    lists = [list(ids) for ids in new_ids]
    n_batch = len(seqs)
    past = [s.n for s in seqs]
    n_new = [len(ids) for ids in lists]
    p_max, n_max = max(past), max(n_new)
    input_ids = torch.zeros((n_batch, n_max), dtype=torch.long)
    mask = torch.zeros((n_batch, p_max + n_max), dtype=torch.long)
    positions = torch.zeros((n_batch, n_max), dtype=torch.long)
    kept = torch.zeros((n_batch, n_max), dtype=torch.bool)
    for i, (ids, p, n, k) in enumerate(zip(lists, past, n_new, keep)):
        input_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
        mask[i, p_max - p : p_max + n] = 1
        kept[i, n - k : n] = True
        positions[i] = torch.arange(p, p + n_max)
    batch = DynamicCache(config=model.config)
    if p_max:
        for layer_idx, layer in enumerate(batch.layers):
            src = [s.cache.layers[layer_idx] for s in seqs]
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
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=batch,
                    use_cache=True, logits_to_keep=kept)
        for i, (seq, n) in enumerate(zip(seqs, n_new)):
            for layer_idx, layer in enumerate(batch.layers):
                seq.cache.layers[layer_idx].update(
                    layer.keys[i : i + 1, :, p_max : p_max + n], layer.values[i : i + 1, :, p_max : p_max + n])
            seq.n += n
    return out.logits.reshape(-1, out.logits.shape[-1])
