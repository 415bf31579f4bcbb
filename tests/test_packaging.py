"""The install extras: `.[device]` fits a device, and every pin has one value.

requirements.txt (what `make setup` installs into the main venv) and pyproject's extras
name the same packages with the same specifiers; this test keeps them in step, so a pin
changed in one place cannot silently differ in the other.
"""
from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: What a device may install, and only that (issue 20): no torch, transformers, onnx, plots.
#: llguidance is the grammar engine both sides apply (protocol/constraints.py): a 10 MB
#: wheel with no dependencies, built for x86_64 and aarch64.
DEVICE_PACKAGES = {"llama-cpp-python", "numpy", "websockets", "aiohttp", "llguidance"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _spec(requirement: str) -> str:
    return requirement[len(_name(requirement)):].replace(" ", "")


def _requirements_txt() -> dict[str, str]:
    out = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out[_name(line)] = _spec(line)
    return out


def _extras() -> dict[str, list[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project.get("dependencies", []) == [], "base dependencies would land on the device too"
    return project["optional-dependencies"]


def test_device_extra_is_exactly_the_device_stack() -> None:
    assert {_name(r) for r in _extras()["device"]} == DEVICE_PACKAGES


def test_extras_and_requirements_txt_pin_the_same() -> None:
    reqs = _requirements_txt()
    extras = _extras()
    assert extras["dev"][0] == "dssd-runtime[device,edge]"
    named = [r for group in ("device", "edge") for r in extras[group]] + extras["dev"][1:]
    specs: dict[str, set[str]] = {}
    for r in named:
        specs.setdefault(_name(r), set()).add(_spec(r))
    assert {n: s for n, s in specs.items() if len(s) > 1} == {}, "one specifier per package"
    assert {n: next(iter(s)) for n, s in specs.items()} == reqs


AMX_CPU = "fpu sse avx2 amx_bf16 amx_tile amx_int8 avx512f"


@pytest.mark.parametrize("flags, native", [(AMX_CPU, "OFF"), ("fpu sse avx2 fma f16c", "ON"), ("fp asimd asimddp", "ON")])
def test_make_device_builds_llama_cpp_natively_unless_the_cpu_has_amx(tmp_path: Path, flags: str, native: str) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    plan = subprocess.run(["make", "-n", "-B", "device", f"CPUINFO={cpuinfo}", "DEVICE_WHEELS=" + str(tmp_path / "w"),
                           "DEVICE_VENV=" + str(tmp_path / "v")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    assert f'CMAKE_ARGS="-DGGML_NATIVE={native} -DLLAVA_BUILD=OFF"' in plan.stdout
    assert ("AMX" in plan.stdout) and (("crash" in plan.stdout) == (native == "OFF"))


@pytest.mark.parametrize("flags", [AMX_CPU, "fpu sse avx2 fma f16c"])
def test_the_main_venv_keeps_the_tested_llama_cpp_flags(tmp_path: Path, flags: str) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    plan = subprocess.run(["make", "-n", "-B", "llama-wheel", f"CPUINFO={cpuinfo}", "WHEELS=" + str(tmp_path / "w")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"' in plan.stdout
