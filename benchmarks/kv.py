"""`python -m benchmarks kv`: batched verification with KV slots against the old re-pack.

One run, one thread, the same loaded target for both: `--sessions` sessions (16) each
prefilled with `--context` random tokens (1,000), then `--repeats` verification rounds
of gamma + 1 = 5 new tokens per session, timed one batched forward at a time:

* `repack` (before, benchmarks/kv_before.py): every session's `DynamicCache` copied
  into a padded batch cache, the new rows concatenated back;
* `slots` (after, edge_service/kv_slots.py): the new tokens packed into one row, their
  keys and values written into each session's slot in place.

After each round both roll back the new tokens (a rejection), so every round runs at the
same context. The two alternate within a repeat (which goes first alternates too).
Reported: median seconds per round of each, the ratio, the largest logits difference
between them (float rounding), and the KV bytes the slots wrote per round against the
new tokens' size. Writes kv.csv / kv.json to --out; prints one JSON document with --json,
else a markdown table.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

GAMMA = 4


def run(target_path: Path, sessions: int, context: int, repeats: int, seed: int = 0) -> dict:
    import torch

    from benchmarks.kv_before import RepackSequence, repack_forward
    from edge_service.backends.torch_backend import TorchTargetModel

    torch.set_num_threads(1)
    model = TorchTargetModel(target_path, threads=1)
    rng = np.random.default_rng(seed)
    contexts = [rng.integers(0, model.n_vocab, context).tolist() for _ in range(sessions)]
    slots = [model.new_sequence() for _ in range(sessions)]
    olds = [RepackSequence(model.model) for _ in range(sessions)]
    for seq, old, ids in zip(slots, olds, contexts):
        seq.reserve(context + GAMMA + 1)
        seq.forward(ids, keep=0)
        old.prefill(ids)
    keep = [GAMMA + 1] * sessions
    times: dict[str, list[float]] = {"repack": [], "slots": []}
    worst = 0.0
    written = []
    pool = model.kv_pool
    for rep in range(repeats + 1):  # the first is a warm-up
        new = [rng.integers(0, model.n_vocab, GAMMA + 1).tolist() for _ in range(sessions)]
        got: dict[str, torch.Tensor] = {}
        for name in (("repack", "slots") if rep % 2 else ("slots", "repack")):
            t0 = time.perf_counter()
            if name == "slots":
                before = pool.bytes_written
                got[name] = model.forward_batch_rows(slots, new, keep)[0].float()
                written.append(pool.bytes_written - before)
            else:
                got[name] = repack_forward(model.model, olds, new, keep).float()
            dt = time.perf_counter() - t0
            if rep:
                times[name].append(dt)
        worst = max(worst, float((got["slots"] - got["repack"]).abs().max()))
        for seq, old in zip(slots, olds):
            seq.rollback(context)
            old.rollback(context)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "target": target_path.name,
        "sessions": sessions,
        "context": context,
        "new_tokens_per_session": GAMMA + 1,
        "repeats": repeats,
        "repack_s": med["repack"],
        "slots_s": med["slots"],
        "repack_range_s": [min(times["repack"]), max(times["repack"])],
        "slots_range_s": [min(times["slots"]), max(times["slots"])],
        "speedup": med["repack"] / med["slots"],
        "max_abs_logit_diff": worst,
        "kv_bytes_written_per_round": statistics.median(written),
        "kv_bytes_of_new_tokens": sessions * (GAMMA + 1) * pool.bytes_per_token,
        "kv_bytes_copied_by_slots": pool.bytes_copied,
        "kv_bytes_per_session_context": context * pool.bytes_per_token,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", type=Path, default=None, help="target model (default: the default pair's)")
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--context", type=int, default=1000, help="tokens of context per session")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (medians)")
    p.add_argument("--out", type=Path, default=Path("bench-results/kv"))
    p.add_argument("--json", action="store_true", help="print one JSON document")


def main(args: argparse.Namespace) -> int:
    from quantize.defaults import default_models

    target = args.target or default_models().target_gguf
    result = run(Path(target), args.sessions, args.context, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kv.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(args.out / "kv.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k, v in result.items() if not isinstance(v, list)])
        w.writeheader()
        w.writerow({k: v for k, v in result.items() if not isinstance(v, list)})
    if args.json:
        print(json.dumps(result))
    else:
        print(f"| sessions x context | repack s/round | slots s/round | speedup | max logit diff |\n"
              f"|---|--:|--:|--:|--:|\n"
              f"| {result['sessions']} x {result['context']} | {result['repack_s']:.3f} | {result['slots_s']:.3f} "
              f"| {result['speedup']:.2f}x | {result['max_abs_logit_diff']:.1e} |")
    print(f"results in {args.out}/ (kv.csv, kv.json)", file=sys.stderr)
    return 0
