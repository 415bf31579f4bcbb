"""The device-only install (`pip install ".[device]"`) runs the device runtime against a real edge.

A fresh venv gets only the device extra, from the llama.cpp wheel that `make setup` built
into .wheels/ and pip's usual package sources (no torch, transformers, onnx, scipy or
matplotlib can be imported there); its `python -m device_runtime` then drafts with the
real SmolLM2 Q4_0 draft against an edge served from the main venv, and the greedy output
must equal transformers' own `generate` on the target. Run from a directory outside the
checkout, so the installed package is what runs, not the sources.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from device_runtime.drafter import LlamaDrafter
from tests.test_end_to_end import reference_greedy
from tests.test_packaging import DEVICE_PACKAGES

REPO = Path(__file__).resolve().parents[1]
#: The wheelhouse `make setup` fills (override: $DSSD_WHEELS, e.g. a wheel built elsewhere).
WHEELS = Path(os.environ.get("DSSD_WHEELS") or REPO / ".wheels")
PROMPT = "The three primary colors are"
N_TOKENS = 24
#: Importable in the main venv, absent from a device venv.
NOT_INSTALLED = ("torch", "transformers", "gguf", "onnx", "onnxruntime", "scipy", "matplotlib")


def _run(cmd: list[str], cwd: Path, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wheels = sorted(WHEELS.glob("llama_cpp_python-*.whl"))
    assert wheels, f"no llama-cpp-python wheel in {WHEELS}: run `make llama-wheel` (part of `make setup`)"
    root = tmp_path_factory.mktemp("device-venv")
    venv.create(root / "venv", with_pip=True)
    py = root / "venv" / "bin" / "python"
    proc = _run([str(py), "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
                 "--find-links", str(WHEELS), f"{REPO}[device]"], cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return py


@pytest.mark.slow
def test_device_venv_has_only_the_device_stack(device_venv: Path) -> None:
    for module in NOT_INSTALLED:
        proc = _run([str(device_venv), "-c", f"import {module}"], cwd=device_venv.parent)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, module
    freeze = _run([str(device_venv), "-m", "pip", "freeze", "--all"], cwd=device_venv.parent).stdout
    names = {line.split("==")[0].split(" @ ")[0].lower().replace("_", "-") for line in freeze.splitlines()}
    assert DEVICE_PACKAGES <= names
    size = _run(["du", "-sh", str(device_venv.parents[1])], cwd=device_venv.parent).stdout.split()[0]
    print(f"device venv: {size}\n{freeze}")  # shown with -s; the figures in docs/deployment.md


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dssd", "edge-only"])
def test_device_venv_generates_exactly_against_the_main_venv_edge(
    mode: str, device_venv: Path, default_pair, default_target, default_edge  # noqa: ANN001
) -> None:
    draft = Path(default_pair.draft_q4_0_gguf)
    proc = _run([str(device_venv), "-m", "device_runtime", "--edge", default_edge.url, "--model", str(draft),
                 "--prompt", PROMPT, "--mode", mode, "--temperature", "0", "-n", str(N_TOKENS), "--gamma", "4",
                 "--threads", "1", "--json"], cwd=device_venv.parent, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    drafter = LlamaDrafter(draft, n_ctx=512, n_threads=1)
    try:
        prompt_ids = drafter.tokenize(PROMPT)  # what the CLI sends for --prompt
    finally:
        drafter.close()
    assert doc["ids"] == reference_greedy(default_target, prompt_ids, N_TOKENS)
    assert doc["exact"] and all(doc["verified"])
    assert "site-packages" in _run([str(device_venv), "-c", "import device_runtime; print(device_runtime.__file__)"],
                                   cwd=device_venv.parent).stdout
