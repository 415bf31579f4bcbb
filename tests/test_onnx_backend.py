"""The ONNX Runtime edge backend against the PyTorch reference backend.

One ``edge-export --format both --int8`` of the tiny target (about 15 s) serves the
whole module. Tests marked ``slow`` export the real SmolLM2 target and print the
verify-step benchmark (PyTorch vs ONNX fp32 vs ONNX int8, ratios from one run).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_service.backends.base import TargetModel
from edge_service.backends.onnx_backend import MANIFEST_NAME, OnnxManifest, OnnxTargetModel
from edge_service.backends.torch_backend import TorchTargetModel
from quantize.tiny import TinyPair

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = [1, 45, 300, 12, 99, 7, 250, 3, 18, 77]

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def exported(tiny_pair: TinyPair, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:  # noqa: F811
    """The tiny target exported through the CLI; returns (directory, CLI stdout)."""
    out = tmp_path_factory.mktemp("edge") / "tiny-edge"
    start = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "quantize", "edge-export", str(tiny_pair.target_gguf), str(out),
         "--format", "both", "--int8", "--threads", "1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr
    print(f"edge-export tiny (both, int8): {time.perf_counter() - start:.1f}s")
    return out, res.stdout


@pytest.fixture(scope="module")
def torch_target(tiny_pair: TinyPair) -> TorchTargetModel:  # noqa: F811
    return TorchTargetModel(tiny_pair.target_gguf, threads=1)


@pytest.fixture(scope="module")
def onnx_fp32(exported: tuple[Path, str]) -> OnnxTargetModel:
    return OnnxTargetModel(exported[0], threads=1, variant="fp32")


def _script(target: TargetModel) -> list[np.ndarray]:
    """Prefill, verify-sized chunks, rollbacks (including to 0) and single steps; all logits rows."""
    seq = target.new_sequence()
    rows = [seq.forward(PROMPT)]
    rows.append(seq.forward([5, 6, 7, 8, 9]))
    seq.rollback(12)
    rows.append(seq.forward([40]))
    rows.append(seq.forward([41, 42, 43]))
    seq.rollback(len(PROMPT))
    rows.append(seq.forward([100, 101, 102, 103, 104]))
    seq.rollback(0)
    rows.append(seq.forward([2, 3]))
    assert seq.n_cached == 2
    seq.release()
    return rows


# --------------------------------------------------------------------------- export


def test_export_writes_checked_files(exported: tuple[Path, str]) -> None:
    out_dir, stdout = exported
    result = dict(line.split("\t", 1) for line in stdout.splitlines())
    files = set(result["files"].split())
    assert {"model.onnx", "model.onnx.data", "model.int8.onnx", MANIFEST_NAME, "model.safetensors",
            "config.json", "tokenizer.json"} <= files
    assert float(result["onnx_fp32_max_logit_diff"]) < 1e-4
    manifest = OnnxManifest.load(out_dir)
    assert manifest.default_variant == "int8" and set(manifest.files) == {"fp32", "int8"}
    assert (manifest.n_layers, manifest.n_kv_heads, manifest.head_dim) == (2, 2, 16)


# --------------------------------------------------------------------------- equality with torch


def test_onnx_logits_equal_torch_including_rollback(onnx_fp32: OnnxTargetModel, torch_target: TorchTargetModel) -> None:
    got, want = _script(onnx_fp32), _script(torch_target)
    diffs = [float(np.abs(g - w).max()) for g, w in zip(got, want)]
    print(f"ONNX fp32 vs torch max |logit diff| per step: {['%.1e' % d for d in diffs]}")
    for g, w in zip(got, want):
        assert g.dtype == np.float32 and g.shape == w.shape
    assert max(diffs) < 1e-4


def test_onnx_is_a_drop_in_for_torch(onnx_fp32: OnnxTargetModel, torch_target: TorchTargetModel) -> None:
    for attr in ("n_vocab", "max_context", "vocab_tokens", "eos_token_ids", "name"):
        assert getattr(onnx_fp32, attr) == getattr(torch_target, attr), attr


def test_onnx_greedy_equals_transformers_generate(onnx_fp32: OnnxTargetModel, torch_target: TorchTargetModel) -> None:
    """Greedy decoding through verify-style chunks and rollbacks reproduces transformers' generate."""
    n = 40
    with torch.inference_mode():
        ref = torch_target.model.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                                          do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    want = ref[0, len(PROMPT):].tolist()
    seq = onnx_fp32.new_sequence()
    out: list[int] = []
    logits = seq.forward(PROMPT)[-1]
    while len(out) < n:
        tok = int(np.argmax(logits))
        out.append(tok)
        # Feed the token plus a wrong 3-token "draft", keep only the token: a rejected round.
        logits = seq.forward([tok, 0, 0, 0])[0]
        seq.rollback(len(PROMPT) + len(out))
    assert out == want


def test_sequences_are_independent(onnx_fp32: OnnxTargetModel) -> None:
    a, b = onnx_fp32.new_sequence(), onnx_fp32.new_sequence()
    a.forward(PROMPT)
    b.forward([9, 8, 7])
    la = a.forward([5])
    fresh = onnx_fp32.new_sequence()
    fresh.forward(PROMPT)
    np.testing.assert_array_equal(la, fresh.forward([5]))
    assert b.n_cached == 3


def test_int8_variant_is_the_default_and_close(exported: tuple[Path, str], onnx_fp32: OnnxTargetModel) -> None:
    int8 = OnnxTargetModel(exported[0], threads=1)
    assert int8.variant == "int8"
    got, want = np.concatenate(_script(int8)), np.concatenate(_script(onnx_fp32))
    corr = float(np.corrcoef(got.ravel(), want.ravel())[0, 1])
    top1 = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    print(f"ONNX int8 vs fp32 on the tiny random model: logit correlation {corr:.3f}, top-1 agreement {top1:.2f}")
    assert np.all(np.isfinite(got)) and corr > 0.9


# --------------------------------------------------------------------------- errors and wiring


def test_errors(exported: tuple[Path, str], onnx_fp32: OnnxTargetModel, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        OnnxTargetModel(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="edge-export"):
        OnnxTargetModel(tmp_path)
    with pytest.raises(ValueError, match="no 'fp16' ONNX model"):
        OnnxTargetModel(exported[0], variant="fp16")
    with pytest.raises(ValueError, match="not available"):
        OnnxTargetModel(exported[0], providers=["NoSuchExecutionProvider"])
    seq = onnx_fp32.new_sequence()
    with pytest.raises(ValueError):
        seq.forward([])
    seq.forward([1, 2, 3])
    with pytest.raises(ValueError):
        seq.rollback(4)
    with pytest.raises(ValueError, match="context"):
        seq.forward([1] * onnx_fp32.max_context)
    seq.release()
    with pytest.raises(ValueError, match="released"):
        seq.forward([1])


def test_edge_service_cli_offers_onnx() -> None:
    from edge_service.__main__ import build_parser

    assert build_parser().parse_args(["--backend", "onnx", "--model", "x"]).backend == "onnx"


def test_hf_directory_source(exported: tuple[Path, str], tmp_path: Path, torch_target: TorchTargetModel) -> None:
    """An HF directory (here the export's safetensors) is a valid edge-export source too."""
    from quantize.edge_export import edge_export

    result = edge_export(exported[0], tmp_path / "again", fmt="safetensors", threads=1)
    again = TorchTargetModel(result.out_dir, threads=1)
    assert again.vocab_tokens == torch_target.vocab_tokens
    np.testing.assert_allclose(again.new_sequence().forward(PROMPT), torch_target.new_sequence().forward(PROMPT),
                               atol=1e-5)


@pytest.mark.parametrize("mode", ["dssd", "dssd-paper", "dsd", "edge-only"])
def test_end_to_end_greedy_with_the_onnx_edge(mode: str, onnx_fp32: OnnxTargetModel, torch_target: TorchTargetModel,
                                              tiny_pair: TinyPair) -> None:
    """The real device against an edge serving the ONNX backend: the target's greedy output."""
    import asyncio

    from device_runtime.drafter import LlamaDrafter
    from device_runtime.session import DeviceClient, GenerationConfig
    from edge_service.server import EdgeServerThread, ServerConfig
    from protocol.sampling import SamplingParams
    from tests.test_end_to_end import reference_greedy

    drafter = LlamaDrafter(tiny_pair.draft_gguf, n_ctx=512, n_threads=1, f32_kv_cache=True)
    ids = drafter.tokenize("The cat sat on the", add_bos=False)
    with EdgeServerThread(onnx_fp32, ServerConfig(port=0)) as edge:
        client = DeviceClient(drafter, edge.url)

        async def go():  # noqa: ANN202
            try:
                return await client.generate(ids, GenerationConfig(mode=mode, max_new_tokens=64,
                                                                   sampling=SamplingParams(0.0), gamma=4))
            finally:
                await client.close()

        result = asyncio.run(go())
    drafter.close()
    assert result.ids == reference_greedy(torch_target, ids, 64)
