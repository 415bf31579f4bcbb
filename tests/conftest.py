"""Shared fixtures: the tiny random pair (fast), the real default pair (slow), an edge on loopback.

Every process here uses one thread per runtime: two runtimes each using both cores of
a 2-core machine slow down erratically (see the toolchain notes).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch

from edge_service.backends.torch_backend import TorchTargetModel
from edge_service.server import EdgeServerThread, ServerConfig
from edge_service.session import EdgeLimits
from tests.fixtures.tiny_models import TinyPair, tiny_pair  # noqa: F401  (re-exported fixture)

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_target(tiny_pair: TinyPair) -> TorchTargetModel:  # noqa: F811
    return TorchTargetModel(tiny_pair.target_gguf, threads=1)


@pytest.fixture(scope="session")
def tiny_edge(tiny_target: TorchTargetModel) -> Iterator[EdgeServerThread]:
    """A real WebSocket edge on loopback serving the tiny target, with the default limits
    (they hold at any speed: there is no frame-rate cap)."""
    config = ServerConfig(port=0, limits=EdgeLimits(max_new_tokens=512))
    with EdgeServerThread(tiny_target, config) as edge:
        yield edge


@pytest.fixture(scope="session")
def default_pair() -> "object":
    """Paths of the real SmolLM2 pair, prepared by `python -m quantize prepare-default`."""
    from quantize.defaults import prepare_default_models

    return prepare_default_models(progress=False)


@pytest.fixture(scope="session")
def default_target(default_pair) -> TorchTargetModel:  # noqa: ANN001
    return TorchTargetModel(Path(default_pair.target_gguf), threads=1)


@pytest.fixture(scope="session")
def default_edge(default_target: TorchTargetModel) -> Iterator[EdgeServerThread]:
    with EdgeServerThread(default_target, ServerConfig(port=0)) as edge:
        yield edge
