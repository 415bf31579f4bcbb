"""Sliding-window layers (Gemma-3's local attention) on the edge: forward, rollback and
re-sync past the window give the logits of a fresh forward over the same tokens.

transformers keeps only `sliding_window - 1` past tokens in such a layer and refuses to
crop it once past the window; the torch backend records the past between forwards, so a
rejected draft can always be dropped, and an older prefix (a re-sync) starts a fresh
sequence. A tiny random Gemma3 (window 4, one global layer) in an HF directory, in seconds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

from edge_service.backends.torch_backend import TorchTargetModel

N_VOCAB = 64
WINDOW = 4


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory: pytest.TempPathFactory) -> TorchTargetModel:
    out = tmp_path_factory.mktemp("tiny-gemma3")
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=N_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=WINDOW,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                              max_position_embeddings=256, query_pre_attn_scalar=16)
    Gemma3ForCausalLM(config).save_pretrained(out)
    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(N_VOCAB)}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(out)
    return TorchTargetModel(out, threads=1)


def _fresh(model: TorchTargetModel, ids: list[int]) -> np.ndarray:
    """Last-position logits of one forward over `ids` from an empty cache."""
    seq = model.new_sequence()
    try:
        return seq.forward(ids, keep=1)[0]
    finally:
        seq.release()


def test_tiny_model_has_sliding_layers(tiny_gemma: TorchTargetModel) -> None:
    seq = tiny_gemma.new_sequence()
    assert seq._window == WINDOW and len(seq._sliding) == 2


def test_drafts_rejected_past_the_window_roll_back_exactly(tiny_gemma: TorchTargetModel) -> None:
    rng = np.random.default_rng(1)
    seq = tiny_gemma.new_sequence()
    ids = rng.integers(0, N_VOCAB, 3).tolist()
    seq.forward(ids, keep=0)
    for _ in range(30):  # rounds of 1-4 draft tokens, some rejected, far past the window
        draft = rng.integers(0, N_VOCAB, int(rng.integers(1, 5))).tolist()
        rows = seq.forward(draft, keep=len(draft))
        np.testing.assert_allclose(rows[-1], _fresh(tiny_gemma, ids + draft), atol=1e-4)
        n_ok = int(rng.integers(0, len(draft) + 1))
        assert seq.can_rollback(len(ids) + n_ok)
        seq.rollback(len(ids) + n_ok)
        ids += draft[:n_ok]
        assert seq.n_cached == len(ids)
    assert len(ids) > 3 * WINDOW
    # past the window, an older prefix is out of reach: said, and refused with a message
    assert not seq.can_rollback(len(ids) - 5)
    with pytest.raises(ValueError, match="sliding-window"):
        seq.rollback(len(ids) - 5)


def test_within_the_window_any_prefix_is_reachable(tiny_gemma: TorchTargetModel) -> None:
    seq = tiny_gemma.new_sequence()
    seq.forward([1, 2], keep=0)
    assert seq.can_rollback(0)
    seq.rollback(0)
    np.testing.assert_allclose(seq.forward([5, 6], keep=1)[0], _fresh(tiny_gemma, [5, 6]), atol=1e-4)
