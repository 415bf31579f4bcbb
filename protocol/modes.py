"""The request modes, named once for the device, the edge, the cost model and the tools.

Why a module of its own: the names are part of the protocol (the device sends one in
`Start`, the edge refuses the ones it does not serve), and they were listed in five
places, which could drift apart.
"""
from __future__ import annotations

#: Modes in which the device drafts and the edge verifies.
SPECULATIVE_MODES: tuple[str, ...] = ("dssd", "dssd-paper", "dsd")
#: Modes the edge serves ("device-only" never reaches it).
EDGE_MODES: tuple[str, ...] = SPECULATIVE_MODES + ("edge-only",)
#: Every mode a device request may ask for.
MODES: tuple[str, ...] = EDGE_MODES + ("device-only",)
