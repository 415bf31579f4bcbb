"""How much of a KV cache survives a new context: the longest common prefix.

Why shared: the device's llama.cpp cache and the edge's target cache both re-sync to a
request's committed tokens (a new request, a resumed one, a draft made ahead) by keeping
the common prefix and recomputing the rest; the rule must be the same on both sides.
"""
from __future__ import annotations

from typing import Sequence


def common_prefix_len(cached: Sequence[int], wanted: Sequence[int]) -> int:
    """Number of leading positions where `cached` and `wanted` hold the same ids."""
    n = 0
    for a, b in zip(cached, wanted):
        if a != b:
            break
        n += 1
    return n
