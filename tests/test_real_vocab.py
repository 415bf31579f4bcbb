"""Real tokenizers without real weights: Qwen2 (padded) and Llama-3 (unpadded) pairs.

The vocabularies are llama.cpp's vocab-only GGUFs (`python -m quantize fetch-vocabs`, part
of `make setup`); `quantize.vocab_models` builds from each an HF-directory target with
random weights of the real architecture and a GGUF draft converted by our own
`hf-to-gguf`. Through the real edge server and the real llama.cpp device: the handshake
pairs them, check-pair gives the same verdict, a real mismatch is refused naming the
differing tokens, and greedy output equals transformers' `generate` on the target
restricted to its real tokens (`suppress_tokens` = the padding ids, as protocol.vocab
documents).
"""
from __future__ import annotations

import asyncio
import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from device_runtime.drafter import LlamaDrafter
from device_runtime.session import DeviceClient, GenerationConfig, GenerationResult
from device_runtime.transport import EdgeError
from dssd_common.gguf_header import read_token_strings
from edge_service.backends.torch_backend import TorchTargetModel
from edge_service.scheduler import BatchConfig
from edge_service.server import EdgeServerThread, ServerConfig
from protocol.sampling import SamplingParams
from protocol.vocab import VocabMismatch, Vocabulary, pair_vocabularies, padding_ids
from protocol.wire import ErrorCode
from quantize.check_pair import PairMismatch, check_pair
from quantize.cli import main as quantize_main
from quantize.vocab_models import VocabPair, VocabPairSpec, build_vocab_pair, fetch_vocabs

GREEDY = SamplingParams(0.0)
PROMPTS = ("Hello world! The quick brown fox", "def reverse(s):\n    return s[::-1]  # 12345")
N_NEW = 24
#: real token counts of llama.cpp's vocab-only GGUFs (Qwen2: 151,936 rows, 290 of them padding)
QWEN2_TOKENS, QWEN2_ROWS = 151_646, 151_936
LLAMA3_TOKENS = 128_256

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vocabs() -> dict[str, Path]:
    return fetch_vocabs()


@pytest.fixture(scope="module")
def pairs(vocabs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, VocabPair]:
    """qwen2: padded, same rows both sides; qwen2-rows: the edge pads to 152,064 rows (as
    Qwen2.5-7B does) and the draft to 151,936 (0.5B); llama3: unpadded, 128,256."""
    root = tmp_path_factory.mktemp("real_vocab")
    return {
        "qwen2": build_vocab_pair(vocabs["qwen2"], root / "qwen2"),
        "qwen2-rows": build_vocab_pair(vocabs["qwen2"], root / "qwen2-rows",
                                       VocabPairSpec(target_rows=152_064, draft_rows=QWEN2_ROWS, seed=1)),
        "llama3": build_vocab_pair(vocabs["llama3"], root / "llama3"),
    }


def _generate(client: DeviceClient, ids: list[int], configs: list[GenerationConfig]) -> list[GenerationResult]:
    async def go() -> list[GenerationResult]:
        try:
            return [await client.generate(ids, c) for c in configs]
        finally:
            await client.close()

    return asyncio.run(go())


def _reference(target: TorchTargetModel, ids: list[int], n_tokens: int, n: int) -> list[int]:
    """transformers' greedy `generate`, restricted to the real tokens like the runtime."""
    model = target.model
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, suppress_tokens=padding_ids(n_tokens, target.n_vocab),
                             pad_token_id=model.generation_config.eos_token_id)
    return out[0, len(ids):].tolist()


def test_the_vocab_ggufs_are_the_real_tokenizers(vocabs: dict[str, Path]) -> None:
    qwen2 = read_token_strings(vocabs["qwen2"])
    v = Vocabulary.of(qwen2, len(qwen2))
    assert (v.n_tokens, v.n_rows) == (QWEN2_TOKENS, QWEN2_ROWS) and qwen2[-1] == f"[PAD{QWEN2_ROWS - 1}]"
    llama3 = read_token_strings(vocabs["llama3"])
    assert Vocabulary.of(llama3, len(llama3)).n_tokens == LLAMA3_TOKENS == len(llama3)


def test_qwen25_tokens_in_qwen2_padding_are_named(vocabs: dict[str, Path]) -> None:
    """Qwen2.5 fills 19 of Qwen2's padding ids with new special tokens: a real in-family mismatch."""
    qwen2 = read_token_strings(vocabs["qwen2"])
    extra = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>"] + [f"<|q25_{i}|>" for i in range(16)]
    qwen25 = qwen2[:QWEN2_TOKENS] + extra + qwen2[QWEN2_TOKENS + len(extra):]
    with pytest.raises(VocabMismatch, match=r"only the edge has ids 151646\.\.151664 \('<\|object_ref_start\|>'"):
        pair_vocabularies(Vocabulary.of(qwen2, QWEN2_ROWS, keep_tokens=True),
                          Vocabulary.of(qwen25, QWEN2_ROWS, keep_tokens=True))


def test_the_hf_tokenizer_splits_text_as_llama_cpp(pairs: dict[str, VocabPair], vocabs: dict[str, Path]) -> None:
    """The target's tokenizer.json (made from the GGUF) and llama.cpp on the converted draft
    agree on llama.cpp's own tokenizer test texts, and with its expected ids."""
    for family in ("qwen2", "llama3"):
        pair = pairs[family]
        hf = AutoTokenizer.from_pretrained(pair.target_dir)
        assert len(hf) == pair.n_tokens
        texts = vocabs[family].with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
        expected = vocabs[family].with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
        drafter = LlamaDrafter(pair.draft_gguf, n_ctx=256, n_threads=1, max_gamma=1)
        try:
            assert drafter.n_real_tokens == pair.n_tokens and drafter.n_vocab == pair.draft_rows
            for text, want in zip(texts, expected):
                ids = drafter.tokenize(text, add_bos=False)
                assert hf(text, add_special_tokens=False).input_ids == ids, (family, text)
                assert ids == [int(t) for t in want.split()], (family, text)
        finally:
            drafter.close()


@pytest.mark.parametrize("name", ["qwen2", "qwen2-rows", "llama3"])
def test_check_pair_verdicts(name: str, pairs: dict[str, VocabPair]) -> None:
    pair = pairs[name]
    report = check_pair(pair.draft_gguf, pair.target_dir, threads=1, n_tokens=8, prompts=PROMPTS[:1])
    p = report.pairing
    assert (p.n_tokens, p.device_rows, p.edge_rows) == (pair.n_tokens, pair.draft_rows, pair.target_rows)
    assert 0.0 <= report.greedy_agreement <= 1.0 and 0.0 < report.alpha <= 1.0
    if name == "qwen2":  # and the CLI prints the same verdict
        out = io.StringIO()
        with redirect_stdout(out):
            assert quantize_main(["-q", "check-pair", str(pair.draft_gguf), str(pair.target_dir),
                                  "--threads", "1", "--tokens", "4"]) == 0
        vocab_line = next(line for line in out.getvalue().splitlines() if line.startswith("vocab\t"))
        assert vocab_line == f"vocab\t{p.describe()}"
        assert f"{QWEN2_TOKENS} real tokens" in vocab_line and "padding rows (never produced): device 290, edge 290" in vocab_line


def test_a_real_mismatch_is_refused_naming_the_tokens(pairs: dict[str, VocabPair]) -> None:
    """A Llama-3 draft against a Qwen2 target: check-pair names the differing ids and tokens;
    the edge refuses the handshake (VOCAB_MISMATCH) before any token."""
    llama3, qwen2 = pairs["llama3"], pairs["qwen2"]
    with pytest.raises(PairMismatch, match=r"vocabularies differ: .*ids hold different tokens \(id \d+: device '.*' vs "
                                           r"edge '.*'.*only the edge has ids 128256\.\.151645 .*cannot be used together"):
        check_pair(llama3.draft_gguf, qwen2.target_dir, threads=1, n_tokens=1, prompts=PROMPTS[:1])
    target = TorchTargetModel(qwen2.target_dir, threads=1)
    drafter = LlamaDrafter(llama3.draft_gguf, n_ctx=256, n_threads=1, max_gamma=4)
    try:
        with EdgeServerThread(target, ServerConfig(port=0)) as edge:
            with pytest.raises(EdgeError) as err:
                _generate(DeviceClient(drafter, edge.url), [1, 2, 3], [GenerationConfig(sampling=GREEDY)])
        assert err.value.code == ErrorCode.VOCAB_MISMATCH
        assert "vocabularies differ" in str(err.value) and f"{QWEN2_TOKENS} real tokens" in str(err.value)
    finally:
        drafter.close()


@pytest.mark.parametrize("name", ["qwen2", "qwen2-rows", "llama3"])
def test_greedy_equals_generate_end_to_end(name: str, pairs: dict[str, VocabPair]) -> None:
    pair = pairs[name]
    target = TorchTargetModel(pair.target_dir, threads=1)
    drafter = LlamaDrafter(pair.draft_gguf, n_ctx=512, n_threads=1, max_gamma=8)
    try:
        with EdgeServerThread(target, ServerConfig(port=0)) as edge:
            for prompt in PROMPTS:
                ids = drafter.tokenize(prompt)
                want = _reference(target, ids, pair.n_tokens, N_NEW)
                configs = [GenerationConfig(mode=m, max_new_tokens=N_NEW, sampling=GREEDY, gamma=4)
                           for m in ("dssd", "dsd")]
                for got in _generate(DeviceClient(drafter, edge.url), ids, configs):
                    assert got.ids == want, (name, prompt, got.stats.mode)
                    assert got.stats.rounds.draft_tokens > 0
    finally:
        drafter.close()


def test_sampled_rounds_across_row_counts(pairs: dict[str, VocabPair]) -> None:
    """Device 151,936 rows, edge 152,064: Q uploads (dsd), full P_j rows (dssd-paper) and
    candidates (dssd) line up past the handshake, on the edge's torch path and on its numpy
    path alike (same seeds, same tokens: both consume the generators identically); nothing
    outside the real tokens comes out."""
    pair = pairs["qwen2-rows"]
    target = TorchTargetModel(pair.target_dir, threads=1)
    drafter = LlamaDrafter(pair.draft_gguf, n_ctx=512, n_threads=1, max_gamma=4)
    ids = drafter.tokenize(PROMPTS[0])
    configs = [GenerationConfig(mode=m, max_new_tokens=16, sampling=SamplingParams(1.0), gamma=3, seed=s,
                                pipeline=False)
               for m in ("dsd", "dssd-paper", "dssd") for s in (1, 2)]
    outputs = []
    try:
        for torch_verify in (True, False):
            config = ServerConfig(port=0, batching=BatchConfig(torch_verify=torch_verify))
            with EdgeServerThread(target, config) as edge:
                outputs.append(_generate(DeviceClient(drafter, edge.url), ids, configs))
    finally:
        drafter.close()
    for results in outputs:
        for got in results:
            assert got.exact and got.ids and max(got.ids) < pair.n_tokens
            assert got.stats.rounds.draft_tokens > 0
        assert sum(r.stats.rounds.draft_tokens - r.stats.rounds.accepted_tokens for r in results) > 0  # rejections
    assert [r.ids for r in outputs[0]] == [r.ids for r in outputs[1]]
