"""The layers point down only, and the shared constants have one definition.

    tests
    benchmarks
    quantize
    device_runtime, edge_service   (siblings: neither imports the other)
    protocol, dssd_common          (siblings: neither imports the other)

Checked on the source (every import statement, including those inside functions), so a
layer that points up fails here rather than as an import cycle or a package that only
works from a checkout.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from device_runtime.api import RequestError, _check_options
from protocol.downlink import DOWNLINKS
from protocol.modes import EDGE_MODES, MODES, SPECULATIVE_MODES
from protocol.wire import MAX_SEED
from tests.astutil import parse_python

REPO = Path(__file__).resolve().parents[1]
RANK = {"protocol": 0, "dssd_common": 0, "device_runtime": 1, "edge_service": 1, "quantize": 2,
        "benchmarks": 3, "tests": 4}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in a file."""
    out = []
    for node in ast.walk(parse_python(path)):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name.split(".")[0]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def test_layers_point_down_only() -> None:
    wrong = []
    for package, rank in RANK.items():
        for path in sorted((REPO / package).rglob("*.py")):
            for line, target in _imports(path):
                if target in RANK and target != package and RANK[target] >= rank:
                    wrong.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert wrong == []


#: Third-party packages the device runtime may import: exactly what `pip install ".[device]"`
#: brings (tests/test_packaging.py checks the extra), so the device venv never needs more.
DEVICE_THIRD_PARTY = {"numpy", "llama_cpp", "websockets", "aiohttp", "llguidance"}
#: Never loaded by the device runtime (a Pi has no torch; `quantize` drags in gguf and pip).
NOT_ON_DEVICE = {"quantize", "edge_service", "benchmarks", "torch", "transformers", "gguf", "onnx", "onnxruntime",
                 "scipy", "matplotlib", "tqdm", "prometheus_client", "sentencepiece"}
_LOAD_DEVICE = """
import json, sys
import device_runtime.__main__ as cli, device_runtime.api, device_runtime.openai_server
cli.build_parser().parse_args(["--model", "x.gguf"]); cli.build_serve_parser().parse_args([])
print(json.dumps(sorted(sys.modules)))
"""


def _device_modules() -> list[str]:
    """Every module loaded by importing the device CLI, its library and its HTTP server."""
    proc = subprocess.run([sys.executable, "-c", _LOAD_DEVICE], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_the_device_runtime_loads_nothing_of_the_edge_or_the_tools() -> None:
    loaded = {name.split(".")[0] for name in _device_modules()}
    assert loaded & NOT_ON_DEVICE == set()


def test_the_device_runtime_imports_only_the_device_extra() -> None:
    """Every import statement (inside functions too) of every project module the device loads."""
    project = [m for m in _device_modules() if m.split(".")[0] in RANK]
    wrong = []
    for module in project:
        path = REPO / Path(*module.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for line, target in _imports(path):
            if target not in RANK and target not in sys.stdlib_module_names and target not in DEVICE_THIRD_PARTY:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert project and wrong == []


def test_modes_nest() -> None:
    assert set(SPECULATIVE_MODES) < set(EDGE_MODES) < set(MODES)
    assert set(MODES) - set(EDGE_MODES) == {"device-only"}


@pytest.mark.parametrize("downlink", DOWNLINKS)
def test_the_api_accepts_every_downlink(downlink: str) -> None:
    _check_options(max_tokens=8, temperature=0.7, top_k=40, top_p=0.95, seed=MAX_SEED, stop=None, mode="dssd",
                   gamma=4, downlink=downlink, max_gamma=16)


def test_the_api_refuses_a_seed_past_the_bound() -> None:
    with pytest.raises(RequestError, match="seed"):
        _check_options(max_tokens=8, temperature=0.7, top_k=40, top_p=0.95, seed=MAX_SEED + 1, stop=None,
                       mode="dssd", gamma=4, downlink="auto", max_gamma=16)
