"""The pure, I/O-free core both sides agree on: sampling transform, verification, wire format.

Nothing in this package touches sockets, files or model libraries; `device_runtime` and
`edge_service` are the adapters around it.
"""
from protocol.sampling import SamplingParams, probabilities, sample
from protocol.verification import (
    Verdict,
    VerdictKind,
    device_resample,
    dsd_verify,
    edge_verify,
    greedy_verify,
)
from protocol.vocab import vocab_fingerprint

__all__ = [
    "SamplingParams",
    "Verdict",
    "VerdictKind",
    "device_resample",
    "dsd_verify",
    "edge_verify",
    "greedy_verify",
    "probabilities",
    "sample",
    "vocab_fingerprint",
]
