"""protocol.vocab: which vocabularies pair, on which ids, and what a refusal says (pure, no models)."""
from __future__ import annotations

import numpy as np
import pytest

from protocol.downlink import RowSupport, encode_rejection
from protocol.verification import Verdict, VerdictKind
from protocol.vocab import (
    VocabMismatch,
    Vocabulary,
    is_padding,
    pair_vocabularies,
    padding_ids,
    real_token_count,
    vocab_fingerprint,
)

TOKENS = ["a", "b", "<|x|>", "ab"]


def padded(tokens: list[str], rows: int) -> list[str]:
    return tokens + [f"[PAD{i}]" for i in range(len(tokens), rows)]


def test_only_the_trailing_run_of_own_id_fillers_is_padding() -> None:
    assert is_padding("[PAD7]", 7) and is_padding(b"[PAD7]", 7) and not is_padding("[PAD7]", 8)
    assert real_token_count(padded(TOKENS, 9)) == 4
    # a filler in the middle, or one naming another id, is a token like any other
    assert real_token_count(["a", "[PAD1]", "b", "[PAD3]"]) == 3
    assert real_token_count(["a", "[PAD9]"]) == 2
    assert padding_ids(4, 7) == [4, 5, 6]


def test_padded_and_unpadded_lists_of_the_same_tokens_fingerprint_alike() -> None:
    gguf_side = Vocabulary.of(padded(TOKENS, 8), 8)
    hf_side = Vocabulary.of(TOKENS, 8)  # an HF tokenizer stops at len(tokenizer)
    assert gguf_side.fingerprint == hf_side.fingerprint == vocab_fingerprint(TOKENS)
    pairing = pair_vocabularies(gguf_side, hf_side)
    assert (pairing.n_tokens, pairing.device_rows, pairing.edge_rows) == (4, 8, 8)
    # another padded row count of the same tokens pairs too (Qwen2.5-0.5B vs 7B)
    pairing = pair_vocabularies(Vocabulary.of(padded(TOKENS, 6), 6), Vocabulary.of(TOKENS, 12))
    assert (pairing.n_tokens, pairing.device_rows, pairing.edge_rows) == (4, 6, 12)
    assert "4 real tokens" in pairing.describe() and "device 6, edge 12" in pairing.describe()
    # the handshake knows the device by fingerprint and rows only
    announced = Vocabulary.announced(gguf_side.fingerprint, 8)
    assert pair_vocabularies(announced, hf_side).n_tokens == 4


def test_differing_tokens_are_named() -> None:
    device = Vocabulary.of(["a", "b", "c", "d"], 4, keep_tokens=True)
    edge = Vocabulary.of(["a", "B", "c", "d", "e", "f"], 8, keep_tokens=True)
    with pytest.raises(VocabMismatch) as err:
        pair_vocabularies(device, edge)
    msg = str(err.value)
    assert "1 ids hold different tokens (id 1: device 'b' vs edge 'B')" in msg
    assert "only the edge has ids 4..5 ('e', 'f')" in msg
    # without the lists (the handshake) the refusal says how to find out
    with pytest.raises(VocabMismatch, match="check-pair"):
        pair_vocabularies(Vocabulary.announced(device.fingerprint, 4), edge)


def test_too_few_rows_for_the_tokens_is_refused() -> None:
    with pytest.raises(VocabMismatch, match="logits rows"):
        pair_vocabularies(Vocabulary.announced(vocab_fingerprint(TOKENS), 3), Vocabulary.of(TOKENS, 4))
    with pytest.raises(VocabMismatch, match="tokenizer has 4 tokens but its model only 3"):
        pair_vocabularies(Vocabulary.of(TOKENS, 4), Vocabulary.of(TOKENS, 3))


def test_full_rejection_rows_are_padded_to_the_device_width() -> None:
    """P_j over the shared ids, sent to a device with more rows: zeros on its padding ids."""
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.25, 0.25, 0.0], np.float32)
    verdict = Verdict(VerdictKind.RESAMPLE, 0)
    for row in (p, RowSupport.of(p)):
        msg = encode_rejection(verdict, row, "full", 0, rng, width=7)
        assert msg.p_full is not None and msg.p_full.shape == (7,)
        np.testing.assert_array_equal(msg.p_full[:4], p)
        assert not msg.p_full[4:].any()
    assert encode_rejection(verdict, p, "full", 0, rng).p_full.shape == (4,)
