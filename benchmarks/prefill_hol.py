"""`python -m benchmarks prefill`: head-of-line delay of a long prompt, chunked vs not.

`--sessions` (8) sessions run greedy DSSD rounds (gamma 4) back to back through the
edge's real `VerifyScheduler` on one model worker thread, in this process (no sockets:
this measures scheduling and forwards, not the network). First `--rounds` rounds each
without any prefill (the baseline), then a ninth session Starts with a `--prompt`-token
(2,000) prompt while the eight keep going. Every round that overlaps the prefill is
"during". Per `--configs` setting `CHUNK:BUDGET` (`BatchConfig.prefill_chunk` and
`token_budget`; 0:0 is the unchunked baseline, the whole prompt in one forward; 256:0
pieces of 256 tokens whatever the batch holds; 256:48 the default, pieces that fill what
the rounds leave of a 48-token forward): p50/p99/max round latency during the prefill and
their ratio to the same sessions' baseline p99 in the same setting, and the prefill's own
time, medians over `--repeats` (settings interleaved). Writes prefill.csv / prefill.json
to --out.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from protocol import wire
from protocol.sampling import SamplingParams

GAMMA = 4
GREEDY = SamplingParams(0.0)


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def _one(model: Any, chunk: int, budget: int, sessions: int, prompt: int, rounds: int, seed: int) -> dict[str, float]:
    from edge_service.scheduler import BatchConfig, VerifyScheduler
    from edge_service.session import EdgeLimits, EdgeSession

    rng = np.random.default_rng(seed)
    pool = ThreadPoolExecutor(max_workers=1)
    loop = asyncio.get_running_loop()

    async def run(fn, *args):  # noqa: ANN001, ANN202
        return await loop.run_in_executor(pool, fn, *args)

    limits = EdgeLimits(max_new_tokens=4096, max_gamma=GAMMA)
    sched = VerifyScheduler(model, BatchConfig(prefill_chunk=chunk, token_budget=budget), run, active=lambda: sessions + 1)

    def session(sid: int, n_prompt: int) -> tuple[EdgeSession, wire.Start]:
        s = EdgeSession(model, limits, sid)
        s.hello(wire.Hello(wire.VERSION, s.fingerprint, model.n_vocab))
        ids = rng.integers(3, min(model.n_vocab, 40_000), n_prompt).astype(np.int32)
        max_new = min(1024, model.max_context - n_prompt - GAMMA - 2)
        return s, wire.Start(mode="dssd", sampling=GREEDY, seed=sid, max_new_tokens=max_new, prompt_ids=ids)

    members = [session(i + 1, 32) for i in range(sessions)]
    for s, start in members:
        await sched.start(s, start)
    committed = [32] * sessions
    lat: list[tuple[float, float]] = []  # (start, end) of every round
    prefill_window = [float("inf"), float("inf")]
    stop = asyncio.Event()

    async def device(i: int) -> None:
        s = members[i][0]
        while not stop.is_set():
            draft = rng.integers(3, min(model.n_vocab, 40_000), GAMMA).astype(np.int32)
            t0 = time.perf_counter()
            v = await sched.submit(s, wire.Draft(committed[i], np.zeros(0, np.int32), draft))
            lat.append((t0, time.perf_counter()))
            committed[i] += v.n_accepted + 1

    async def newcomer() -> None:
        while len(lat) < rounds * sessions:
            await asyncio.sleep(0.005)
        s, start = session(99, prompt)
        prefill_window[0] = time.perf_counter()
        await sched.start(s, start)
        prefill_window[1] = time.perf_counter()
        await asyncio.sleep(0.2)  # a few more rounds after it
        stop.set()
        members.append((s, start))

    await asyncio.gather(newcomer(), *(device(i) for i in range(sessions)))
    await sched.close()
    pool.shutdown()
    for s, _ in members:
        s.close()
    a, b = prefill_window
    base = [e - s for s, e in lat if e < a]
    during = [e - s for s, e in lat if s < b and e > a]
    return {"baseline_p50_s": _p(base, 50), "baseline_p99_s": _p(base, 99), "during_p50_s": _p(during, 50),
            "during_p99_s": _p(during, 99), "during_max_s": max(during), "during_rounds": len(during),
            "prefill_s": b - a}


def run(target: Path, sessions: int, prompt: int, configs: list[tuple[int, int]], rounds: int,
        repeats: int) -> list[dict]:
    import torch

    from edge_service.backends.torch_backend import TorchTargetModel

    torch.set_num_threads(1)
    model = TorchTargetModel(target, threads=1)
    raw: dict[tuple[int, int], list[dict[str, float]]] = {c: [] for c in configs}
    asyncio.run(_one(model, *configs[-1], sessions, 64, 2, 0))  # warm-up
    for rep in range(repeats):
        for config in (configs if rep % 2 == 0 else configs[::-1]):
            raw[config].append(asyncio.run(_one(model, *config, sessions, prompt, rounds, rep)))
    rows = []
    for config in configs:
        med = {k: statistics.median(r[k] for r in raw[config]) for k in raw[config][0]}
        med["ratio_p99_vs_baseline"] = statistics.median(r["during_p99_s"] / r["baseline_p99_s"] for r in raw[config])
        rows.append({"prefill_chunk": config[0], "token_budget": config[1], "sessions": sessions,
                     "prompt_tokens": prompt, "repeats": repeats, **med})
    return rows


def parse_config(text: str) -> tuple[int, int]:
    """`CHUNK:BUDGET` (or `CHUNK`, no budget) as two ints."""
    chunk, _, budget = text.strip().partition(":")
    return int(chunk), int(budget or 0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", type=Path, default=None, help="target model (default: the default pair's)")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--prompt", type=int, default=2000, help="tokens of the arriving prompt")
    p.add_argument("--configs", default="0:0,256:0,32:0,256:64,256:48",
                   help="comma list of PREFILL_CHUNK:TOKEN_BUDGET settings to compare (0:0: not chunked)")
    p.add_argument("--rounds", type=int, default=6, help="baseline rounds per session before the prompt arrives")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench-results/prefill"))
    p.add_argument("--json", action="store_true", help="print one JSON document")


def main(args: argparse.Namespace) -> int:
    from quantize.defaults import default_models

    target = Path(args.target or default_models().target_gguf)
    configs = [parse_config(x) for x in args.configs.split(",") if x.strip()]
    rows = run(target, args.sessions, args.prompt, configs, args.rounds, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefill.json").write_text(json.dumps(rows, indent=1) + "\n")
    with open(args.out / "prefill.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if args.json:
        print(json.dumps(rows))
    else:
        print("| prefill chunk | token budget | baseline p99 ms | during p50 ms | during p99 ms | p99 ratio | prefill s |\n"
              "|--:|--:|--:|--:|--:|--:|--:|")
        for r in rows:
            print(f"| {r['prefill_chunk'] or 'none'} | {r['token_budget'] or 'none'} | {1000 * r['baseline_p99_s']:.0f} | {1000 * r['during_p50_s']:.0f} "
                  f"| {1000 * r['during_p99_s']:.0f} | {r['ratio_p99_vs_baseline']:.2f}x | {r['prefill_s']:.1f} |")
    print(f"results in {args.out}/ (prefill.csv, prefill.json)", file=sys.stderr)
    return 0
