"""Low-level helpers that both runtimes and the tools share, below all of them.

Why a package of its own: `device_runtime` and `edge_service` both need the default
model paths, a fast GGUF header reader, a background event-loop thread and the
longest-common-prefix re-sync of a KV cache. Kept in `quantize` (model preparation) or
in either runtime, they made the layers point up or sideways. `protocol` is the pure
core (no I/O, numpy only); this package is the other floor: standard library plus
`gguf` for its format constants, and it imports nothing else of the project.

Layers (each imports only those below it)::

    quantize, benchmarks
    device_runtime, edge_service
    protocol, dssd_common
"""
