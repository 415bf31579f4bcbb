"""KV caches that stay put (edge_service/kv_slots.py) and the scheduler around them.

* a batched round writes exactly the new tokens' KV into the slots (bytes counted) and
  moves no held KV (buffers stay at their addresses with their contents, nothing copied;
  the old re-pack copied every session's whole cache twice per round);
* Gemma-3-style sliding-window layers are served by the slots (context longer than the
  window), batched with other sequences and rollbacks: logits equal transformers' own
  forward, greedy decoding equals `generate`;
* the KV budget refuses a Start with LIMIT when it does not fit, evicts idle sessions
  (least recently used first) to make room, and an evicted session resumes by re-prefill
  with the same logits;
* edge-only steps batched with verification rounds, and chunked Starts interleaved with
  them, give the replies of the unbatched session;
* a prompt that arrives while other sessions run rounds is prefilled in pieces inside
  their forwards, within the token budget, and both sides' replies stay those of the
  unbatched sessions.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

from edge_service.backends.torch_backend import TorchTargetModel
from edge_service.scheduler import BatchConfig, VerifyScheduler
from edge_service.session import EdgeLimits, EdgeSession, ProtocolError
from protocol import wire
from protocol.sampling import SamplingParams
from protocol.verification import VerdictKind
from protocol.wire import ErrorCode

GREEDY = SamplingParams(0.0)


def _slot_ptrs(seq) -> list[int]:  # noqa: ANN001
    slot = seq._slot
    return [t.data_ptr() for t in slot.keys + slot.values]


def test_a_batched_round_copies_no_kv_beyond_the_new_tokens(tiny_target: TorchTargetModel) -> None:
    rng = np.random.default_rng(0)
    pool = tiny_target.kv_pool
    contexts = (300, 120, 1, 250)
    seqs = [tiny_target.new_sequence() for _ in contexts]
    for seq, n in zip(seqs, contexts):
        seq.reserve(n + 40)
        seq.forward(rng.integers(0, tiny_target.n_vocab, n).tolist(), keep=0)
    ptrs = [_slot_ptrs(s) for s in seqs]
    for step in range(4):
        new = [rng.integers(0, tiny_target.n_vocab, int(rng.integers(1, 7))).tolist() for _ in seqs]
        written, copied = pool.bytes_written, pool.bytes_copied
        held = [[t[:, : s.n_cached].clone() for t in s._slot.keys + s._slot.values] for s in seqs]
        tiny_target.forward_batch_rows(seqs, new, [len(ids) for ids in new])
        assert pool.bytes_written - written == sum(map(len, new)) * pool.bytes_per_token
        assert pool.bytes_copied == copied
        assert [_slot_ptrs(s) for s in seqs] == ptrs  # the KV stayed where it was ...
        for seq, before in zip(seqs, held):  # ... untouched, the new rows right after it
            for t, b in zip(seq._slot.keys + seq._slot.values, before):
                assert torch.equal(t[:, : b.shape[1]], b)
        for seq, ids in zip(seqs, new):  # a rejection: rollback is a length change
            seq.rollback(seq.n_cached - int(rng.integers(0, len(ids) + 1)))
    for seq in seqs:
        seq.release()
    assert all(not s._slot for s in seqs)


# -- sliding-window layers ----------------------------------------------------------------

WINDOW = 6


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> TorchTargetModel:
    """A tiny random Gemma-3 text model: three sliding-window layers (window 6), one global."""
    d: Path = tmp_path_factory.mktemp("gemma3")
    n_vocab = 96
    config = Gemma3TextConfig(
        vocab_size=n_vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, max_position_embeddings=256,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(d)
    vocab = {f"t{i}": i for i in range(n_vocab)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0"))).save_pretrained(d)
    return TorchTargetModel(d, threads=1)


def _reference(model: TorchTargetModel, ids: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return model.model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def test_sliding_window_layers_batched_in_their_slots(gemma3: TorchTargetModel) -> None:
    rng = np.random.default_rng(3)
    n_vocab = gemma3.n_vocab
    seqs = [gemma3.new_sequence() for _ in range(3)]
    held: list[list[int]] = [rng.integers(3, n_vocab, n).tolist() for n in (2, 25, 13)]
    for seq, ids in zip(seqs, held):
        seq.forward(ids, keep=0)
    worst = 0.0
    for step in range(6):
        new = [rng.integers(3, n_vocab, int(rng.integers(1, 9))).tolist() for _ in seqs]
        got = gemma3.forward_batch(seqs, new)
        for i, (ids, g) in enumerate(zip(new, got)):
            want = _reference(gemma3, held[i] + ids)[len(held[i]):]
            worst = max(worst, float(np.abs(g - want).max()))
            keep = len(held[i]) + len(ids) - int(rng.integers(0, len(ids) + 1))
            held[i] = (held[i] + ids)[:keep]
            seqs[i].rollback(keep)
    assert max(map(len, held)) > 3 * WINDOW  # the windows mattered
    assert worst < 1e-4
    # the reference has power: the same model without its windows gives other logits
    full = _reference(gemma3, held[1])
    gemma3.model.config.sliding_window = 10_000
    try:
        assert np.abs(_reference(gemma3, held[1]) - full).max() > 1e-3
    finally:
        gemma3.model.config.sliding_window = WINDOW
    for seq in seqs:
        seq.release()


def test_sliding_window_greedy_equals_generate(gemma3: TorchTargetModel) -> None:
    prompt = [5, 17, 33, 8, 40, 12, 9]
    n_new = 24
    with torch.inference_mode():
        ref = gemma3.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)[0, len(prompt):].tolist()
    seq, other = gemma3.new_sequence(), gemma3.new_sequence()
    other.forward(list(range(3, 40)), keep=0)
    logits = seq.forward(prompt, keep=1)[-1]
    out = [int(np.argmax(logits))]
    while len(out) < n_new:  # decode in batches with another session, one token at a time
        rows = gemma3.forward_batch([other, seq], [[7, 8], out[-1:]], [1, 1])
        other.rollback(other.n_cached - 2)
        out.append(int(np.argmax(rows[1][-1])))
    assert out == ref
    seq.release()
    other.release()


# -- the KV budget -------------------------------------------------------------------------


def _session(model, sid: int) -> EdgeSession:  # noqa: ANN001
    s = EdgeSession(model, EdgeLimits(max_new_tokens=64, max_gamma=4), sid)
    s.hello(wire.Hello(wire.VERSION, s.fingerprint, model.n_vocab))
    return s


def _start(prompt: list[int], mode: str = "dssd", sampling: SamplingParams = GREEDY, seed: int = 1,
           max_new: int = 40) -> wire.Start:
    return wire.Start(mode=mode, sampling=sampling, seed=seed, max_new_tokens=max_new,
                      prompt_ids=np.asarray(prompt, np.int32), downlink="auto")


def test_kv_budget_refuses_with_limit_and_evicts_idle_sessions(tiny_pair) -> None:  # noqa: ANN001
    probe = TorchTargetModel(tiny_pair.target_gguf, threads=1)
    per_request = (10 + 40 + 4 + 1) * probe.kv_pool.bytes_per_token  # prompt + max_new + gamma + 1
    model = TorchTargetModel(tiny_pair.target_gguf, threads=1, kv_budget_mb=2.5 * per_request / 2**20)
    prompts = [list(range(1 + 10 * i, 11 + 10 * i)) for i in range(3)]
    a, b, c = (_session(model, i + 1) for i in range(3))
    a.start(_start(prompts[0]))
    b.start(_start(prompts[1]))
    with pytest.raises(ProtocolError) as err:  # two requests running: no room for a third
        c.start(_start(prompts[2]))
    assert err.value.code == ErrorCode.LIMIT and "budget" in str(err.value)
    a.end(wire.End(len(prompts[0])))  # a is idle now: its cache may go
    c.start(_start(prompts[2]))
    assert model.kv_pool.evictions == 1 and a.sequence.n_cached == 0 and b.sequence.n_cached == 9
    assert model.kv_pool.reserved_bytes <= model.kv_pool.budget_bytes
    b.end(wire.End(len(prompts[1])))
    a.start(_start(prompts[0]))  # a resumes by re-prefill (b, idle, is evicted)
    draft = wire.Draft(len(prompts[0]), np.zeros(0, np.int32), np.array([4, 5], np.int32), None, None)
    fresh = _session(probe, 9)
    fresh.start(_start(prompts[0]))
    assert a.verify(draft) == fresh.verify(draft)
    for s in (a, b, c, fresh):
        s.close()
    assert model.kv_pool.reserved_bytes == 0


# -- scheduler: edge-only steps in the batches, chunked Starts between them ---------------------


def _check_and_advance(reply: wire.VerdictMsg, want: wire.VerdictMsg, committed: list[int],
                       prefix: list[list[int]], i: int) -> None:
    """The batched verdict equals the unbatched one; session i's device state follows it."""
    assert (reply.kind, reply.n_accepted, reply.token) == (want.kind, want.n_accepted, want.token)
    committed[i] += len(prefix[i]) + reply.n_accepted
    if reply.kind is VerdictKind.RESAMPLE:  # the device's residual draw: any supported token
        tok = int(reply.p_ids[0]) if reply.p_ids is not None else int(np.argmax(reply.p_full))
        prefix[i] = [tok]
    else:
        committed[i] += 1
        prefix[i] = []


def test_edge_only_steps_and_chunked_starts_join_the_batches(tiny_target: TorchTargetModel) -> None:
    rng = np.random.default_rng(5)
    n_vocab = tiny_target.n_vocab
    specs = [("edge-only", GREEDY), ("edge-only", SamplingParams(0.9, top_k=8)), ("dssd", GREEDY),
             ("dssd", SamplingParams(1.0, top_k=6)), ("edge-only", SamplingParams(1.0))]
    prompts = [rng.integers(0, n_vocab, n).tolist() for n in (3, 40, 17, 25, 9)]
    alone = [_session(tiny_target, i + 1) for i in range(len(specs))]
    batched = [_session(tiny_target, i + 1) for i in range(len(specs))]
    for s, (mode, sp), p, i in zip(alone, specs, prompts, range(len(specs))):
        s.start(_start(p, mode, sp, seed=i))
    pool = ThreadPoolExecutor(max_workers=1)

    async def go() -> None:
        loop = asyncio.get_running_loop()

        async def run(fn, *args):  # noqa: ANN001, ANN202
            return await loop.run_in_executor(pool, fn, *args)

        sched = VerifyScheduler(tiny_target, BatchConfig(window_ms=50, max_batch=8, prefill_chunk=4), run,
                                active=lambda: len(specs))
        await asyncio.gather(*(sched.start(s, _start(p, m, sp, seed=i))
                               for i, (s, (m, sp), p) in enumerate(zip(batched, specs, prompts))))
        committed = [len(p) for p in prompts]
        prefix: list[list[int]] = [[] for _ in specs]
        for _ in range(6):
            calls, msgs = [], []
            for i, (s, (mode, sp)) in enumerate(zip(batched, specs)):
                if mode == "edge-only":
                    msgs.append(None)
                    calls.append(sched.step(s))
                    continue
                draft = rng.integers(0, n_vocab, 3).astype(np.int32)
                q = None if sp.greedy else rng.uniform(0.1, 1, 3).astype(np.float32)
                msg = wire.Draft(committed[i] + len(prefix[i]), np.asarray(prefix[i], np.int32), draft, q, None)
                msgs.append(msg)
                calls.append(sched.submit(s, msg))
            got = await asyncio.gather(*calls)
            for i, (reply, msg) in enumerate(zip(got, msgs)):
                if msg is None:
                    want = alone[i].edge_only_step()
                    assert reply.ids.tolist() == want.ids.tolist() and reply.done == want.done
                else:
                    _check_and_advance(reply, alone[i].verify(msg), committed, prefix, i)
                assert batched[i]._cached == alone[i]._cached
        assert sched.rounds == 6 * len(specs)  # every step and round went through the batches
        assert sched.batches < sched.rounds
        await sched.close()

    asyncio.run(go())
    pool.shutdown()
    for s in alone + batched:
        s.close()


def test_a_prompt_is_prefilled_inside_the_rounds_forwards_within_the_token_budget(
        tiny_target: TorchTargetModel) -> None:
    rng = np.random.default_rng(9)
    n_vocab = tiny_target.n_vocab
    budget, gamma = 24, 3
    prompts = [rng.integers(0, n_vocab, n).tolist() for n in (5, 12, 8, 100)]
    specs = [GREEDY, SamplingParams(1.0, top_k=6), GREEDY, GREEDY]
    alone = [_session(tiny_target, i + 1) for i in range(4)]
    batched = [_session(tiny_target, i + 1) for i in range(4)]
    for s, p, sp, i in zip(alone, prompts, specs, range(4)):
        s.start(_start(p, "dssd", sp, seed=i, max_new=64))
    pool = ThreadPoolExecutor(max_workers=1)

    async def go() -> None:
        loop = asyncio.get_running_loop()

        async def run(fn, *args):  # noqa: ANN001, ANN202
            return await loop.run_in_executor(pool, fn, *args)

        # a long window: a forward of prefill pieces alone would wait for the rounds; the
        # newcomer counts as connected once its Start is done (the batches do not wait for it)
        joined: list[bool] = []
        sched = VerifyScheduler(tiny_target, BatchConfig(window_ms=10_000, max_batch=8, prefill_chunk=256,
                                                         token_budget=budget), run, active=lambda: 3 + len(joined))
        for i in range(3):  # (through the scheduler, each would wait the window for rounds)
            await run(batched[i].start, _start(prompts[i], "dssd", specs[i], seed=i, max_new=64))
        committed = [len(p) for p in prompts]
        prefix: list[list[int]] = [[] for _ in range(4)]

        async def rounds(members: list[int]) -> None:
            msgs = []
            for i in members:
                q = None if specs[i].greedy else rng.uniform(0.1, 1, gamma).astype(np.float32)
                draft = rng.integers(0, n_vocab, gamma).astype(np.int32)
                msgs.append(wire.Draft(committed[i] + len(prefix[i]), np.asarray(prefix[i], np.int32), draft, q,
                                       None))
            got = await asyncio.gather(*(sched.submit(batched[i], m) for i, m in zip(members, msgs)))
            for i, reply, msg in zip(members, got, msgs):
                _check_and_advance(reply, alone[i].verify(msg), committed, prefix, i)
                assert batched[i]._cached == alone[i]._cached

        newcomer = asyncio.ensure_future(sched.start(batched[3], _start(prompts[3], "dssd", specs[3], seed=3, max_new=64)))
        while not newcomer.done():
            await rounds([0, 1, 2])
        await newcomer
        joined.append(True)
        assert batched[3]._cached == prompts[3][:-1]
        assert sched.prefill_tokens_with_rounds > 0
        assert sched.max_tokens_with_rounds <= budget
        for _ in range(3):  # the newcomer's cache is the unbatched one's: same verdicts
            await rounds([0, 1, 2, 3])
        await sched.close()

    asyncio.run(go())
    pool.shutdown()
    for s in alone + batched:
        s.close()
