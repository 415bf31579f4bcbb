"""The llama-cpp-python adapter: its version gate, and that the drafter goes only through it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from device_runtime import llama_adapter
from device_runtime.llama_adapter import UnsupportedLlamaCpp, check_version, parse_version
from tests.astutil import parse_python

REPO = Path(__file__).resolve().parents[1]
#: What only the adapter may touch: llama-cpp-python's private fields and raw C bindings.
PRIVATE_FIELDS = {"_ctx", "_model", "n_tokens"}
LOW_LEVEL_PREFIX = "llama_"


def test_installed_version_is_supported() -> None:
    check_version(llama_adapter.llama_cpp.__version__)


@pytest.mark.parametrize("version", ["0.3.36", "0.3.37", "0.3.99", "0.3.36.dev0"])
def test_supported_versions(version: str) -> None:
    check_version(version)


@pytest.mark.parametrize("version", ["0.3.35", "0.2.90", "0.4.0", "1.0.0", "garbage"])
def test_unsupported_versions_fail_with_a_clear_message(version: str) -> None:
    with pytest.raises(UnsupportedLlamaCpp, match="llama-cpp-python"):
        check_version(version)


def test_parse_version() -> None:
    assert parse_version("0.3.36") == (0, 3, 36)
    assert parse_version("0.4") == (0, 4, 0)


def _internal_uses(path: Path) -> list[str]:
    """`x._ctx`, `x._model`, `x.n_tokens = ...` and `llama_cpp.llama_*` in one file."""
    tree = parse_python(path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            llama_call = (isinstance(node.value, ast.Name) and node.value.id == "llama_cpp"
                          and node.attr.startswith(LOW_LEVEL_PREFIX))
            private = node.attr in PRIVATE_FIELDS - {"n_tokens"} and not (
                isinstance(node.value, ast.Name) and node.value.id == "self")
            written = node.attr == "n_tokens" and isinstance(node.ctx, ast.Store)
            if llama_call or private or written:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} .{node.attr}")
        if isinstance(node, ast.ImportFrom) and node.module == "llama_cpp":
            found.extend(f"{path.relative_to(REPO)}:{node.lineno} from llama_cpp import {a.name}"
                         for a in node.names if a.name.startswith(LOW_LEVEL_PREFIX))
    return found


def test_only_the_adapter_touches_llama_cpp_internals() -> None:
    adapter = REPO / "device_runtime" / "llama_adapter.py"
    files = [p for d in ("device_runtime", "edge_service", "quantize", "benchmarks", "tests", "dssd_common")
             for p in sorted((REPO / d).rglob("*.py")) if p != adapter and p != Path(__file__).resolve()]
    assert [use for p in files for use in _internal_uses(p)] == []
