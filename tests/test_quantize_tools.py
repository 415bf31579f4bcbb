"""Tests for the model-preparation tools: gguf, hf-to-gguf, edge-export (safetensors), check-pair.

Fast tests use tiny random models built here from the tiny GGUF fixture: its tokenizer
(a real byte-level BPE) is saved as an HF tokenizer, and random HF checkpoints of each
supported architecture are written next to it. llama.cpp runs with an f32 KV cache and
without flash attention so it can be compared with transformers number for number.
Tests marked ``slow`` use the real SmolLM2 pair from ``prepare-default``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch

from dssd_common.gguf_header import read_token_strings, scan_gguf
from quantize.check_pair import PairMismatch, check_pair
from quantize.edge_export import EdgeExportError, edge_export
from quantize.gguf_quant import needs_super_blocks, requantize
from quantize.hf_to_gguf import HfToGgufError, convert_hf_to_gguf, permute_rotary_rows
from quantize.tokenizer_meta import PRE_TOKENIZERS, TokenizerError, detect_pre_tokenizer, hf_pre_tokenizer
from quantize.tiny import TinyPair

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_TEXT = "Hello world! The quick brown fox 12345 jumps over the lazy dog. What is 6789?"
#: Random HF checkpoints: name -> (config class, extra config). All share the tiny tokenizer.
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "llama-tied-bias": ("LlamaConfig", {"tie_word_embeddings": True, "attention_bias": True}),
    "mistral-head-dim": ("MistralConfig", {"head_dim": 32, "sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
}

torch.set_num_threads(1)


# --------------------------------------------------------------------------- helpers


def _run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quantize", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _kv(stdout: str) -> dict[str, str]:
    """The CLI's key<TAB>value result lines (the last value wins for repeated keys)."""
    return dict(line.split("\t", 1) for line in stdout.splitlines() if "\t" in line)


def _llama(path: Path, *, logits_all: bool = True) -> llama_cpp.Llama:
    """Exact single-thread llama.cpp: f32 KV cache, no flash attention."""
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, n_threads_batch=1, n_batch=256,
                           logits_all=logits_all, type_k=0, type_v=0, flash_attn=False, verbose=False)


def _llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = _llama(path)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def _llama_tokens(path: Path, text: str) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=False, special=True)
    finally:
        llm.close()


def _hf_logits(hf_dir: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].numpy()


@dataclass(frozen=True)
class HfModels:
    tokenizer_dir: Path
    dirs: dict[str, Path]


def _random_hf_model(out: Path, config_class: str, extra: dict, tokenizer_dir: Path, n_vocab: int) -> Path:
    """A 2-layer random checkpoint with weights large enough for peaked, order-sensitive logits."""
    import shutil

    import transformers

    cls = getattr(transformers, config_class)
    config = cls(vocab_size=n_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.5)  # HF initialises biases to 0, which would hide a missing bias
    model.save_pretrained(out)
    for f in tokenizer_dir.glob("*"):
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def hf_models(tiny_pair: TinyPair, tmp_path_factory: pytest.TempPathFactory) -> HfModels:  # noqa: F811
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("hf_models")
    tok_dir = root / "tokenizer"
    AutoTokenizer.from_pretrained(str(tiny_pair.directory), gguf_file=tiny_pair.target_gguf.name).save_pretrained(tok_dir)
    dirs = {name: _random_hf_model(root / name, cls, extra, tok_dir, tiny_pair.n_vocab)
            for name, (cls, extra) in VARIANTS.items()}
    return HfModels(tok_dir, dirs)


# --------------------------------------------------------------------------- CLI surface


@pytest.mark.parametrize("command", ["gguf", "hf-to-gguf", "edge-export", "check-pair"])
def test_cli_help(command: str) -> None:
    res = _run_cli(command, "--help")
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout and res.stderr == ""


def test_cli_errors_are_one_line(tmp_path: Path, tiny_pair: TinyPair) -> None:  # noqa: F811
    cases = [
        ("gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "o.gguf"), "--type", "Q4_0"),
        ("gguf", str(tiny_pair.target_gguf), str(tmp_path / "o.gguf"), "--type", "Q3_XL"),
        ("hf-to-gguf", str(tmp_path), str(tmp_path / "o.gguf")),
        ("edge-export", str(tiny_pair.target_gguf), str(tmp_path / "e"), "--format", "onnx", "--dtype", "bf16"),
        ("edge-export", str(tiny_pair.target_gguf), str(tmp_path / "e"), "--format", "safetensors", "--int8"),
        ("check-pair", str(tmp_path / "missing.gguf"), str(tiny_pair.target_gguf)),
    ]
    for args in cases:
        res = _run_cli("-q", *args)
        assert res.returncode == 1, (args, res.stderr)
        assert res.stdout == ""
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "error:" in lines[0], (args, res.stderr)


# --------------------------------------------------------------------------- gguf


def test_gguf_q4_k_m_reports_fallback_and_runs(tiny_pair: TinyPair, tmp_path: Path) -> None:  # noqa: F811
    dst = tmp_path / "tiny-q4_k_m.gguf"
    res = _run_cli("gguf", str(tiny_pair.target_gguf), str(dst), "--type", "Q4_K_M", "--threads", "1")
    assert res.returncode == 0, res.stderr
    out = _kv(res.stdout)
    assert Path(out["path"]) == dst and int(out["size_bytes"]) == dst.stat().st_size
    types = dict(kv.split("=") for kv in out["tensor_types"].split())
    assert sum(map(int, types.values())) == len(scan_gguf(tiny_pair.target_gguf).tensors)
    # Widths 64 and 192 are not multiples of 256: no k-quant type can be used at all.
    assert not any(t.endswith("_K") for t in types), types
    assert "not multiples of 256" in out["fallback"] and "64" in out["fallback"], out["fallback"]
    assert "not multiples of 256" in res.stderr  # also said on stderr, as a warning
    assert dst.stat().st_size < tiny_pair.target_gguf.stat().st_size / 3

    ids = _llama_tokens(dst, SAMPLE_TEXT)
    logits = _llama_logits(dst, ids)
    ref = _llama_logits(tiny_pair.target_gguf, ids)
    assert logits.shape == ref.shape and np.all(np.isfinite(logits))
    agreement = float(np.mean(logits.argmax(-1) == ref.argmax(-1)))
    print(f"Q4_K_M (fallback) vs f32 top-1 agreement {agreement:.2f}")
    assert agreement > 0.3


def test_gguf_q8_0_has_no_fallback(tiny_pair: TinyPair, tmp_path: Path) -> None:  # noqa: F811
    result = requantize(tiny_pair.target_gguf, tmp_path / "q8.gguf", "Q8_0", nthread=1, progress=False)
    assert result.fallback is None
    assert result.report.tensor_types.get("Q8_0", 0) >= 14
    ref = _llama_logits(tiny_pair.target_gguf, [5, 6, 7, 8])
    got = _llama_logits(tmp_path / "q8.gguf", [5, 6, 7, 8])
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert needs_super_blocks("Q4_K_M") and needs_super_blocks("iq4_xs") and not needs_super_blocks("Q8_0")


# --------------------------------------------------------------------------- hf-to-gguf


def test_permute_rotary_rows_interleaves_halves() -> None:
    w = np.arange(8, dtype=np.float32).reshape(8, 1)  # 2 heads x 4 rows: halves [0,1],[2,3]
    assert permute_rotary_rows(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_pre_tokenizer_table_round_trips() -> None:
    for name in PRE_TOKENIZERS:
        assert detect_pre_tokenizer(hf_pre_tokenizer(name)) == name
    assert detect_pre_tokenizer({"type": "Whitespace"}) is None
    assert hf_pre_tokenizer("no-such-pre") is None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_to_gguf_f32_matches_transformers(variant: str, hf_models: HfModels, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    hf_dir = hf_models.dirs[variant]
    out = tmp_path / f"{variant}.gguf"
    report = convert_hf_to_gguf(hf_dir, out, "f32", progress=False)
    assert report.tensor_types == {"F32": report.n_tensors}
    meta = scan_gguf(out).metadata
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["tokenizer.ggml.model"] == "gpt2"

    ids = _llama_tokens(out, SAMPLE_TEXT)
    # tokenizer.json itself: transformers' AutoTokenizer substitutes its own pre-tokenizer for qwen2.
    assert ids == Tokenizer.from_file(str(hf_dir / "tokenizer.json")).encode(SAMPLE_TEXT).ids
    want = _hf_logits(hf_dir, ids)
    got = _llama_logits(out, ids)
    diff = float(np.abs(got - want).max())
    print(f"{variant}: llama.cpp vs transformers max |logit diff| {diff:.2e} (logit scale {np.abs(want).max():.1f})")
    assert diff < 1e-4
    assert np.std(want) > 0.1, "random logits too flat to catch a wrong permutation"


def test_hf_to_gguf_f16_and_q8_0_load_and_run(hf_models: HfModels, tmp_path: Path) -> None:
    hf_dir = hf_models.dirs["llama"]
    ids = _llama_tokens(convert_hf_to_gguf(hf_dir, tmp_path / "f32.gguf", "f32", progress=False).path, SAMPLE_TEXT)
    want = _hf_logits(hf_dir, ids)
    for outtype, matrix_type, tolerance in (("f16", "F16", 0.05), ("q8_0", "Q8_0", 0.25)):
        report = convert_hf_to_gguf(hf_dir, tmp_path / f"{outtype}.gguf", outtype, progress=False)
        assert report.tensor_types[matrix_type] == 2 * 7 + 2  # 7 matrices per layer + embedding + output
        assert report.tensor_types["F32"] == 2 * 2 + 1  # norms stay F32
        got = _llama_logits(report.path, ids)
        rel = float(np.abs(got - want).max() / np.abs(want).max())
        print(f"{outtype}: max relative logit diff {rel:.3g}")
        assert rel < tolerance


def test_hf_to_gguf_refuses_unsupported(hf_models: HfModels, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "gpt2"
    shutil.copytree(hf_models.dirs["llama"], bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(HfToGgufError, match="GPT2LMHeadModel.*not supported.*LlamaForCausalLM"):
        convert_hf_to_gguf(bad, tmp_path / "x.gguf", "f32", progress=False)
    res = _run_cli("hf-to-gguf", str(bad), str(tmp_path / "x.gguf"))
    assert res.returncode == 1 and "not supported" in res.stderr
    assert not (tmp_path / "x.gguf").exists()

    (bad / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(HfToGgufError, match="rope type 'yarn'"):
        convert_hf_to_gguf(bad, tmp_path / "x.gguf", "f32", progress=False)

    (bad / "config.json").write_text(json.dumps(config))
    tok = json.loads((bad / "tokenizer.json").read_text())
    (bad / "tokenizer.json").write_text(json.dumps({**tok, "pre_tokenizer": {"type": "Whitespace"}}))
    with pytest.raises(TokenizerError, match="--tokenizer-pre"):
        convert_hf_to_gguf(bad, tmp_path / "x.gguf", "f32", progress=False)
    report = convert_hf_to_gguf(bad, tmp_path / "x.gguf", "f32", tokenizer_pre="gpt-2", progress=False)
    assert scan_gguf(report.path).metadata["tokenizer.ggml.pre"] == "gpt-2"


def test_hf_to_gguf_sentencepiece_tokenizer(tmp_path: Path) -> None:
    """Llama-2/Mistral-style checkpoints: a SentencePiece tokenizer.model becomes a llama.cpp 'llama' vocab."""
    import io

    import sentencepiece

    from quantize.tiny import CORPUS

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.split(". ") * 20), model_writer=buffer, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # as Llama 2's tokenizer
    )
    hf_dir = tmp_path / "spm-llama"
    hf_dir.mkdir()
    (hf_dir / "tokenizer.model").write_bytes(buffer.getvalue())
    _random_hf_model(hf_dir, "LlamaConfig", {}, tmp_path / "no-extra-tokenizer-files", 400)
    out = convert_hf_to_gguf(hf_dir, tmp_path / "spm.gguf", "f32", progress=False).path
    meta = scan_gguf(out).metadata
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_bos_token"] is True

    sp = sentencepiece.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    for text in (SAMPLE_TEXT, "  two spaces\nnew line, bytes: \u00fc \u4e16\u754c"):
        assert _llama_tokens(out, text) == sp.encode(text), text
    ids = [1, *sp.encode(SAMPLE_TEXT)]
    assert np.abs(_llama_logits(out, ids) - _hf_logits(hf_dir, ids)).max() < 1e-4


def test_gguf_to_hf_to_gguf_round_trip(tiny_pair: TinyPair, tmp_path: Path) -> None:  # noqa: F811
    """GGUF -> edge-export safetensors -> hf-to-gguf f32 gives back the same model and tokenizer."""
    hf_dir = tmp_path / "hf"
    result = edge_export(tiny_pair.target_gguf, hf_dir, fmt="safetensors", threads=1)
    assert "model.safetensors" in result.files and "tokenizer.json" in result.files
    assert not any(f.endswith(".onnx") for f in result.files)
    res = _run_cli("hf-to-gguf", str(hf_dir), str(tmp_path / "back.gguf"), "--outtype", "f32")
    assert res.returncode == 0, res.stderr
    back = Path(_kv(res.stdout)["path"])

    assert read_token_strings(back) == read_token_strings(tiny_pair.target_gguf)
    orig, new = gguf.GGUFReader(tiny_pair.target_gguf), gguf.GGUFReader(back)
    for key in ("tokenizer.ggml.merges", "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.add_bos_token", "llama.rope.dimension_count", "llama.attention.head_count_kv"):
        assert new.get_field(key).contents() == orig.get_field(key).contents(), key  # type: ignore[union-attr]
    for t_orig in orig.tensors:  # the q/k permutation is undone by transformers and redone here
        t_new = next(t for t in new.tensors if t.name == t_orig.name)
        np.testing.assert_array_equal(np.asarray(t_new.data), np.asarray(t_orig.data), err_msg=t_orig.name)
    ids = _llama_tokens(back, SAMPLE_TEXT)
    assert ids == _llama_tokens(tiny_pair.target_gguf, SAMPLE_TEXT)
    np.testing.assert_array_equal(_llama_logits(back, ids), _llama_logits(tiny_pair.target_gguf, ids))


def test_edge_export_safetensors_dtypes(tiny_pair: TinyPair, tmp_path: Path) -> None:  # noqa: F811
    from safetensors import safe_open

    from edge_service.backends.torch_backend import TorchTargetModel

    for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        out = tmp_path / dtype
        edge_export(tiny_pair.target_gguf, out, fmt="safetensors", dtype=dtype, threads=1)
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch_dtype}
    with pytest.raises(EdgeExportError, match="not empty"):
        edge_export(tiny_pair.target_gguf, tmp_path / "fp16", fmt="safetensors")
    edge = TorchTargetModel(tmp_path / "fp16", threads=1)
    ref = TorchTargetModel(tiny_pair.target_gguf, threads=1)
    assert edge.vocab_tokens == ref.vocab_tokens and edge.eos_token_ids == ref.eos_token_ids
    ids = [5, 6, 7, 8, 9]
    a, b = edge.new_sequence().forward(ids), ref.new_sequence().forward(ids)
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()


# --------------------------------------------------------------------------- check-pair


def test_check_pair_tiny(tiny_pair: TinyPair) -> None:  # noqa: F811
    res = _run_cli("check-pair", str(tiny_pair.draft_gguf), str(tiny_pair.target_gguf), "--threads", "1")
    assert res.returncode == 0, res.stderr
    out = _kv(res.stdout)
    print(res.stdout)
    assert out["vocab"].startswith("identical sha256:")
    agreement, alpha = float(out["greedy_agreement"]), float(out["alpha"])
    assert 0.5 < agreement < 0.95 and 0.5 < alpha < 0.95  # draft = target + 4% noise: about 0.75
    assert int(out["positions"]) > 60
    assert 1.0 < float(out["expected_tokens_per_round_gamma4"]) < 5.0


def test_check_pair_same_model_agrees(tiny_pair: TinyPair) -> None:  # noqa: F811
    report = check_pair(tiny_pair.target_gguf, tiny_pair.target_gguf, threads=1, n_tokens=16)
    # Only llama.cpp's f16 KV cache separates the two runtimes.
    assert report.greedy_agreement > 0.95 and report.alpha > 0.97, report


def test_check_pair_refuses_other_vocab(tiny_pair: TinyPair) -> None:  # noqa: F811
    # The CLI turns this ToolError into one "error:" line and exit code 1 (test_cli_errors_are_one_line).
    with pytest.raises(PairMismatch, match=r"vocabularies differ.*8 ids hold different tokens \(id \d+: device .* vs edge .*cannot be used together"):
        check_pair(tiny_pair.other_vocab_gguf, tiny_pair.target_gguf, threads=1)


# --------------------------------------------------------------------------- slow: the real SmolLM2 pair


@pytest.fixture(scope="module")
def smollm2() -> Iterator[object]:
    from quantize.defaults import prepare_default_models

    yield prepare_default_models(progress=False)


@pytest.mark.slow
def test_check_pair_default_pair(smollm2: object) -> None:
    for draft in (smollm2.draft_q4_1_gguf, smollm2.draft_q4_0_gguf):  # type: ignore[attr-defined]
        start = time.perf_counter()
        res = _run_cli("check-pair", str(draft), str(smollm2.target_gguf), "--threads", "1", timeout=900)  # type: ignore[attr-defined]
        assert res.returncode == 0, res.stderr
        out = _kv(res.stdout)
        print(f"check-pair {draft.name}: greedy_agreement {out['greedy_agreement']} alpha {out['alpha']} "
              f"over {out['positions']} positions ({time.perf_counter() - start:.0f}s)")
        assert out["vocab"].startswith("identical")
        assert 0.5 < float(out["alpha"]) <= 1.0


@pytest.mark.slow
def test_gguf_q4_k_m_on_smollm2_falls_back(smollm2: object, tmp_path: Path) -> None:
    result = requantize(smollm2.draft_q4_1_gguf, tmp_path / "q4_k_m.gguf", "Q4_K_M", nthread=1, progress=False)  # type: ignore[attr-defined]
    print(f"Q4_K_M: {result.report.size_bytes / 1e6:.1f} MB {dict(result.report.tensor_types)}; "
          f"{result.fallback.describe() if result.fallback else 'no fallback'}")
    assert result.fallback is not None and 576 in result.fallback.widths


@pytest.mark.slow
def test_smollm2_gguf_hf_gguf_round_trip_tokenizer(smollm2: object, tmp_path: Path) -> None:
    """SmolLM2's 'smollm' pre-tokenizer (digits split one by one) survives GGUF -> HF -> GGUF."""
    from transformers import AutoTokenizer

    src = smollm2.target_gguf  # type: ignore[attr-defined]
    hf_dir = tmp_path / "hf"
    edge_export(src, hf_dir, fmt="safetensors", dtype="fp16", threads=1)
    text = "In 2024, 12345 people paid $6.78 each. Hello world!"
    assert AutoTokenizer.from_pretrained(str(hf_dir))(text)["input_ids"] == _llama_tokens(src, text)
    report = convert_hf_to_gguf(hf_dir, tmp_path / "back-f16.gguf", "f16", progress=False)
    meta = scan_gguf(report.path).metadata
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert read_token_strings(report.path) == read_token_strings(src)
    assert _llama_tokens(report.path, text) == _llama_tokens(src, text)
