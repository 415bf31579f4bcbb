"""Tests for the quantize package.

Fast tests use a tiny random llama-architecture GGUF built here in milliseconds.
Tests marked ``slow`` prepare the real default models in the default models
directory (./models, or $DSSD_MODELS_DIR) so that the Q4_0 derivation happens once
per machine rather than once per test run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gguf
from dssd_common.gguf_header import GGUFError, scan_gguf
from quantize import defaults
from quantize.defaults import DefaultModels, default_models, prepare_default_models
from quantize.requantize import RequantizeError, dequantize_to_f16, quantize_gguf, read_report

REPO_ROOT = Path(__file__).resolve().parents[1]

CHATML = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
)
N_GEN = 32


# --------------------------------------------------------------------------- helpers


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quantize", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env,
    )


def _write_tiny_llama(path: Path, *, n_embd: int = 64, n_ff: int = 128, n_vocab: int = 64) -> dict[str, np.ndarray]:
    """A 1-layer llama GGUF with Q8_0 matrices and F32 norms; returns the float weights."""
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (n_vocab, n_embd),
        "blk.0.attn_norm.weight": (n_embd,),
        "blk.0.attn_q.weight": (n_embd, n_embd),
        "blk.0.attn_k.weight": (n_embd, n_embd),
        "blk.0.attn_v.weight": (n_embd, n_embd),
        "blk.0.attn_output.weight": (n_embd, n_embd),
        "blk.0.ffn_norm.weight": (n_embd,),
        "blk.0.ffn_gate.weight": (n_ff, n_embd),
        "blk.0.ffn_up.weight": (n_ff, n_embd),
        "blk.0.ffn_down.weight": (n_embd, n_ff),
        "output_norm.weight": (n_embd,),
        "output.weight": (n_vocab, n_embd),
    }
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_context_length(128)
    w.add_embedding_length(n_embd)
    w.add_block_count(1)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // 2)
    w.add_vocab_size(n_vocab)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(n_vocab)])
    w.add_token_types([1] * n_vocab)
    w.add_chat_template("{{ messages }}")
    weights: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            arr = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            w.add_tensor(name, arr)
            weights[name] = arr
        else:
            arr = (0.05 * rng.standard_normal(shape)).astype(np.float32)
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            weights[name] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def _greedy_agreement(draft_path: Path, ref_path: Path) -> tuple[float, int]:
    """Fraction of positions where the draft's argmax equals the reference's greedy token.

    The reference generates N_GEN greedy tokens per prompt; the draft then sees the
    same prefix (teacher forcing), which is exactly the per-token acceptance of
    greedy speculative decoding.
    """
    from llama_cpp import Llama

    kw = dict(n_ctx=256, n_threads=1, n_threads_batch=1, logits_all=True, verbose=False, seed=0)
    ref = Llama(model_path=str(ref_path), **kw)
    draft = Llama(model_path=str(draft_path), **kw)
    hits = total = 0
    for prompt in PROMPTS:
        toks = ref.tokenize(CHATML.format(prompt).encode(), add_bos=False, special=True)
        ref.reset()
        ref.eval(toks)
        gen: list[int] = []
        for _ in range(N_GEN):
            nxt = int(np.argmax(ref.scores[ref.n_tokens - 1]))
            gen.append(nxt)
            ref.eval([nxt])
        draft.reset()
        draft.eval(toks + gen)
        pred = np.argmax(draft.scores[len(toks) - 1 : len(toks) - 1 + N_GEN], axis=-1)
        hits += int(np.sum(pred == np.asarray(gen)))
        total += N_GEN
    return hits / total, total


def _fingerprint(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


# --------------------------------------------------------------------------- fast tests


def test_cli_help() -> None:
    top = _run_cli("--help")
    assert top.returncode == 0, top.stderr
    assert "prepare-default" in top.stdout
    sub = _run_cli("prepare-default", "--help")
    assert sub.returncode == 0, sub.stderr
    assert "--models-dir" in sub.stdout
    assert defaults.MODELS_DIR_ENV in sub.stdout


def test_cli_requires_command() -> None:
    res = _run_cli()
    assert res.returncode == 2
    assert "COMMAND" in res.stderr or "required" in res.stderr


def test_cli_error_is_one_line(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    res = _run_cli("prepare-default", "--models-dir", str(not_a_dir))
    assert res.returncode == 1
    assert res.stdout == ""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error:" in lines[0], res.stderr


def test_default_models_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(defaults.MODELS_DIR_ENV, raising=False)
    m = default_models()
    assert m.models_dir == tmp_path / "models"
    assert m.target_gguf == m.draft_q4_1_gguf == tmp_path / "models" / defaults.Q4_1_FILENAME
    assert m.draft_q4_0_gguf == tmp_path / "models" / defaults.Q4_0_FILENAME
    assert not (tmp_path / "models").exists(), "default_models must not create anything"

    monkeypatch.setenv(defaults.MODELS_DIR_ENV, str(tmp_path / "env"))
    assert default_models().models_dir == tmp_path / "env"
    assert default_models(tmp_path / "flag").models_dir == tmp_path / "flag"
    assert default_models("rel").models_dir == tmp_path / "rel"
    assert isinstance(m, DefaultModels)
    with pytest.raises(AttributeError):
        m.models_dir = tmp_path  # type: ignore[misc]  # frozen


def test_dequantize_to_f16_tiny(tmp_path: Path) -> None:
    src = tmp_path / "tiny-q8_0.gguf"
    weights = _write_tiny_llama(src)
    dst = tmp_path / "tiny-f16.gguf"
    report = dequantize_to_f16(src, dst, progress=False)

    assert report.path == dst and report.size_bytes == dst.stat().st_size
    assert report.file_type == int(gguf.LlamaFileType.MOSTLY_F16)
    assert report.tensor_types == {"F16": 9, "F32": 3}
    assert not list(tmp_path.glob(".*.tmp")), "temporary file left behind"

    reader = gguf.GGUFReader(dst)
    for t in reader.tensors:
        expected = weights[t.name]
        got = np.asarray(t.data, dtype=np.float32).reshape(expected.shape)
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    src_reader = gguf.GGUFReader(src)
    for key in ("tokenizer.ggml.tokens", "tokenizer.chat_template", "llama.embedding_length"):
        assert reader.get_field(key).contents() == src_reader.get_field(key).contents()  # type: ignore[union-attr]


def test_scan_gguf_matches_reader(tmp_path: Path) -> None:
    src = tmp_path / "tiny.gguf"
    _write_tiny_llama(src)
    summary = scan_gguf(src)
    reader = gguf.GGUFReader(src)
    assert summary.complete and summary.file_size == src.stat().st_size
    assert summary.metadata["tokenizer.ggml.tokens"] == 64  # arrays: length only
    assert summary.metadata["general.architecture"] == "llama"
    assert len(summary.tensors) == len(reader.tensors)
    for mine, theirs in zip(summary.tensors, reader.tensors):
        assert mine.name == theirs.name and mine.tensor_type == theirs.tensor_type
        assert mine.shape == tuple(int(d) for d in theirs.shape)
        assert summary.data_start + mine.offset == theirs.data_offset
        assert mine.n_bytes == theirs.n_bytes
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(GGUFError):
        scan_gguf(bad)


def test_quantize_gguf_tiny(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    src = tmp_path / "tiny-q8_0.gguf"
    _write_tiny_llama(src)
    dst = tmp_path / "tiny-q4_0.gguf"
    report = quantize_gguf(src, dst, "Q4_0", nthread=1, progress=False)
    assert report.file_type == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert report.tensor_types.get("Q4_0", 0) >= 7
    assert report.tensor_types.get("F32") == 3
    assert report.n_tensors == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-q4_0.gguf", "tiny-q8_0.gguf"]

    # The cheap validity check used by prepare-default: accepts it, rejects a truncated copy.
    assert defaults.is_valid_q4_0(dst, reference=src)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(dst.read_bytes()[:-100])
    assert not scan_gguf(cut).complete
    assert not defaults.is_valid_q4_0(cut, reference=src)
    assert not defaults.is_valid_q4_0(src, reference=src)  # Q8_0, not Q4_0
    cut.unlink()

    f16 = quantize_gguf(src, tmp_path / "tiny-f16.gguf", "f16", progress=False)
    assert f16.tensor_types == {"F16": 9, "F32": 3}
    with pytest.raises(RequantizeError, match="unknown ftype"):
        quantize_gguf(src, tmp_path / "x.gguf", "Q3_XL")


# --------------------------------------------------------------------------- slow tests (real model)


@pytest.fixture(scope="module")
def prepared() -> DefaultModels:
    start = time.perf_counter()
    models = prepare_default_models(progress=False)
    print(f"prepare_default_models: {time.perf_counter() - start:.1f}s")
    return models


@pytest.mark.slow
def test_prepare_default_idempotent(prepared: DefaultModels) -> None:
    assert prepared == default_models()
    assert not prepared.missing()
    before = {p: _fingerprint(p) for p in (prepared.draft_q4_1_gguf, prepared.draft_q4_0_gguf)}
    start = time.perf_counter()
    again = prepare_default_models(progress=False)
    elapsed = time.perf_counter() - start
    assert again == prepared
    assert {p: _fingerprint(p) for p in before} == before, "second run modified files"
    assert elapsed < 5, f"second run took {elapsed:.1f}s; it should only validate"
    leftovers = [p.name for p in prepared.models_dir.iterdir() if p.name.startswith(".") or "f16" in p.name]
    assert not leftovers, f"temporary/intermediate files left: {leftovers}"


@pytest.mark.slow
def test_q4_0_tensor_types(prepared: DefaultModels) -> None:
    report = read_report(prepared.draft_q4_0_gguf)
    print(f"Q4_0 draft: {report.size_bytes} bytes, {report.tensor_types}")
    assert report.file_type == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert report.tensor_types.get("Q4_0", 0) >= 200
    assert "Q4_1" not in report.tensor_types
    src = read_report(prepared.draft_q4_1_gguf)
    assert report.n_tensors == src.n_tensors
    assert report.size_bytes < src.size_bytes


@pytest.mark.slow
def test_q4_0_loads_and_generates(prepared: DefaultModels) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=str(prepared.draft_q4_0_gguf), n_ctx=128, n_threads=1, verbose=False, seed=0)
    toks = llm.tokenize(CHATML.format(PROMPTS[0]).encode(), add_bos=False, special=True)
    assert len(toks) > 5 and llm.n_vocab() == 49152
    out = llm.create_completion(llm.detokenize(toks).decode(), max_tokens=8, temperature=0.0)
    text = out["choices"][0]["text"]
    assert out["usage"]["completion_tokens"] >= 1 and text.strip(), out


@pytest.mark.slow
def test_q4_0_vs_q4_1_greedy_agreement(prepared: DefaultModels) -> None:
    agreement, n = _greedy_agreement(prepared.draft_q4_0_gguf, prepared.draft_q4_1_gguf)
    print(f"greedy agreement Q4_0 vs Q4_1 over {n} tokens: {agreement:.3f}")
    assert 0.3 < agreement < 1.0


@pytest.mark.slow
def test_cli_prepare_default_prints_paths(prepared: DefaultModels) -> None:
    env = dict(os.environ)
    env.pop(defaults.MODELS_DIR_ENV, None)
    res = _run_cli("-q", "prepare-default", "--models-dir", str(prepared.models_dir), env=env)
    assert res.returncode == 0, res.stderr
    paths = dict(line.split("\t") for line in res.stdout.splitlines())
    assert Path(paths["draft_q4_0_gguf"]) == prepared.draft_q4_0_gguf
    assert Path(paths["target_gguf"]) == prepared.target_gguf == Path(paths["draft_q4_1_gguf"])
