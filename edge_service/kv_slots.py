"""KV caches that stay put: one persistent buffer per session, written in place by a
batched forward, under a memory budget.

Why: the first batched forward copied every session's whole `DynamicCache` into a fresh
padded batch cache and concatenated the new rows back: O(sum of contexts) of memory
traffic per round and twice the KV at peak. Here each session owns a *slot*: per layer a
key and a value buffer of shape (kv_heads, capacity, head_dim), reserved once for the
request (prompt + max_new_tokens + a round) so it never grows mid-request. A forward
writes only the new tokens' keys and values into the slots, at each row's own length;
attention reads each slot in place (a view, no copy); rollback is a length change.

How it plugs into transformers without forking model code: the model runs with the
attention implementation `ATTENTION` (registered in transformers' `AttentionInterface`).
A batched forward packs the new tokens of all sessions into one row (no padding, each
token with its own position id) and passes a `SlotPlan` through the model's keyword
arguments, which transformers hands to every attention call. For each layer the slot
attention writes the packed new keys/values into the slots and runs
`scaled_dot_product_attention` per session over its own slot, with its own causal and
sliding-window mask (Gemma-3 style local layers: the window bounds the keys read, no
fallback). Without a plan (e.g. `model.generate` in a reference test) it is exactly
transformers' own sdpa attention.

Memory: `KVPool` counts the bytes reserved by every slot against an optional budget.
When a reservation does not fit, idle slots (sessions between requests, whose cache is
kept only for prefix reuse) are evicted least recently used first; their sessions
re-prefill on their next request. If it still does not fit, `KVBudgetExceeded` (the
session turns it into a LIMIT error): the edge refuses work, it never runs out of memory.
Sliding-window layers keep their full length too (a ring buffer would make rollback a
copy): their reservation counts like a full layer's.
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from edge_service.backends.base import KVBudgetExceeded

#: The transformers attention implementation name of the slot attention.
ATTENTION = "dssd_kv_slots"
#: Keyword argument that carries the `SlotPlan` through the model's forward.
PLAN_KWARG = "dssd_slot_plan"
#: Smallest growth step of an unreserved slot (tokens), so token-by-token use does not
#: reallocate every call.
MIN_GROWTH = 64

_register_lock = threading.Lock()


@dataclass
class KVSlot:
    """One session's KV: per layer (kv_heads, capacity, head_dim) keys and values."""

    pool: "KVPool"
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0  # tokens held (rows 0..length-1 of every layer are valid)
    capacity: int = 0
    idle: bool = False  # between requests: may be evicted under memory pressure
    last_used: int = 0
    released: bool = False

    @property
    def nbytes(self) -> int:
        return self.capacity * self.pool.bytes_per_token

    def ensure(self, n_tokens: int, *, exact: bool = False) -> None:
        """Capacity for `n_tokens`; grows (copying what is held, counted) if needed.

        `exact`: reserve just that (a request's reservation); else grow geometrically.
        """
        self.pool.touch(self)
        if n_tokens <= self.capacity:
            return
        want = n_tokens if exact else max(n_tokens, 2 * self.capacity, MIN_GROWTH)
        want = min(want, self.pool.max_tokens) if n_tokens <= self.pool.max_tokens else n_tokens
        self.pool.grow(self, want)


@dataclass
class Segment:
    """One session's part of a packed forward: tokens start..start+n, after `past` held."""

    slot: KVSlot
    start: int
    n: int
    past: int


@dataclass
class SlotPlan:
    """What the slot attention needs for one forward (passed as a model kwarg)."""

    segments: list[Segment]
    layers_done: set[int] = field(default_factory=set)
    bytes_written: int = 0


class KVPool:
    """All slots of one model: shapes, the memory budget and the eviction order."""

    def __init__(self, *, n_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, max_tokens: int, budget_bytes: int | None = None) -> None:
        self.n_layers = n_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.max_tokens = max_tokens
        self.budget_bytes = budget_bytes
        elem = torch.empty((), dtype=dtype).element_size()
        #: bytes of KV one token takes in one slot, all layers, keys and values
        self.bytes_per_token = 2 * n_layers * kv_heads * head_dim * elem
        self.reserved_bytes = 0
        self.bytes_written = 0  # KV bytes written by forwards (new tokens only)
        self.bytes_copied = 0  # KV bytes moved by slot growth (0 after a reservation)
        self.evictions = 0
        self._slots: list[KVSlot] = []
        self._clock = itertools.count(1)

    def new_slot(self) -> KVSlot:
        slot = KVSlot(self)
        self._slots.append(slot)
        self.touch(slot)
        return slot

    def touch(self, slot: KVSlot) -> None:
        slot.idle = False
        slot.last_used = next(self._clock)

    def grow(self, slot: KVSlot, capacity: int) -> None:
        """Reallocate `slot` to `capacity` tokens within the budget (evicting idle slots)."""
        extra = (capacity - slot.capacity) * self.bytes_per_token
        self._make_room(extra, slot)
        shape = (self.kv_heads, capacity, self.head_dim)
        new_k = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        new_v = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        if slot.length:
            for layer in range(self.n_layers):
                new_k[layer][:, : slot.length] = slot.keys[layer][:, : slot.length]
                new_v[layer][:, : slot.length] = slot.values[layer][:, : slot.length]
            self.bytes_copied += slot.length * self.bytes_per_token
        slot.keys, slot.values = new_k, new_v
        self.reserved_bytes += extra
        slot.capacity = capacity

    def _make_room(self, extra: int, for_slot: KVSlot) -> None:
        if self.budget_bytes is None or self.reserved_bytes + extra <= self.budget_bytes:
            return
        idle = sorted((s for s in self._slots if s.idle and s is not for_slot and s.capacity), key=lambda s: s.last_used)
        for victim in idle:
            self.evict(victim)
            if self.reserved_bytes + extra <= self.budget_bytes:
                return
        raise KVBudgetExceeded(
            f"the edge's KV budget of {self.budget_bytes / 2**20:.1f} MiB is in use "
            f"({self.reserved_bytes / 2**20:.1f} MiB reserved by running sessions); "
            f"{extra / 2**20:.1f} MiB more needed ({extra // self.bytes_per_token} tokens)")

    def evict(self, slot: KVSlot) -> None:
        """Drop a slot's buffers; its session re-prefills on its next request."""
        self.reserved_bytes -= slot.nbytes
        slot.keys, slot.values = [], []
        slot.capacity = slot.length = 0
        self.evictions += 1

    def release(self, slot: KVSlot) -> None:
        if slot.released:
            return
        self.reserved_bytes -= slot.nbytes
        slot.keys, slot.values = [], []
        slot.capacity = slot.length = 0
        slot.released = True
        self._slots.remove(slot)

    # -- the forward ----------------------------------------------------------------

    def plan(self, slots: list[KVSlot], counts: list[int]) -> SlotPlan:
        """Room for `counts[i]` new tokens in `slots[i]`, and the packed layout."""
        segments = []
        start = 0
        for slot, n in zip(slots, counts):
            slot.ensure(slot.length + n)
            segments.append(Segment(slot, start, n, slot.length))
            start += n
        return SlotPlan(segments)

    def commit(self, plan: SlotPlan) -> None:
        """After the forward: every layer wrote its keys; the slots now hold the new tokens."""
        if len(plan.layers_done) != self.n_layers:
            raise RuntimeError(
                f"the model's attention wrote {len(plan.layers_done)} of {self.n_layers} layers into the KV "
                f"slots: it does not run through the {ATTENTION!r} attention")
        for seg in plan.segments:
            seg.slot.length = seg.past + seg.n
        self.bytes_written += plan.bytes_written


def slot_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: in-place slot KV when a plan is passed, else sdpa.

    `query` (1, q_heads, T, D) and `key`/`value` (1, kv_heads, T, D) are the packed new
    tokens of all segments (rotary positions applied). Returns (1, T, q_heads, D).
    """
    plan: SlotPlan | None = kwargs.pop(PLAN_KWARG, None)
    if plan is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("attention logit soft-capping is not supported by the KV slots")
    layer = int(module.layer_idx)
    scaling = kwargs.get("scaling")
    window = kwargs.get("sliding_window")
    n_q, n_kv = query.shape[1], key.shape[1]
    out = query.new_empty((1, query.shape[2], n_q, query.shape[3]))
    for seg in plan.segments:
        s, n, p = seg.start, seg.n, seg.past
        keys, values = seg.slot.keys[layer], seg.slot.values[layer]
        keys[:, p : p + n] = key[0, :, s : s + n]
        values[:, p : p + n] = value[0, :, s : s + n]
        end = p + n
        lo = max(0, p + 1 - window) if window else 0
        mask = None  # one query sees every key from lo on: no mask
        if n > 1:
            q_pos = torch.arange(p, end, device=query.device)[:, None]
            k_pos = torch.arange(lo, end, device=query.device)[None, :]
            mask = k_pos <= q_pos
            if window:
                mask &= k_pos > q_pos - window
        att = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s : s + n], keys[None, :, lo:end], values[None, :, lo:end], attn_mask=mask,
            scale=scaling, enable_gqa=n_q != n_kv)
        out[0, s : s + n] = att[0].transpose(0, 1)
    plan.layers_done.add(layer)
    plan.bytes_written += 2 * key.shape[2] * key.shape[1] * key.shape[3] * key.element_size()
    return out, None


def register_attention() -> None:
    """Make `ATTENTION` known to transformers (idempotent): the slot attention, and the
    sdpa mask for forwards without a plan."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    with _register_lock:
        AttentionInterface.register(ATTENTION, slot_attention)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
