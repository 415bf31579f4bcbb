"""`python -m benchmarks gpu`: the edge on a CUDA device, in one script (< 8 min on one GPU).

For each dtype (bf16, fp32) on `--device` (cuda):

1. greedy equality: the edge's own path (KV slots, batched with other sessions, chunked
   prompt) against transformers' `generate` on the same device and dtype, `--prompts`
   prompts x `--tokens` tokens; reports the first divergence if any (in bf16, batched and
   single kernels may round differently: a divergence there is reported, not hidden);
2. forward time by batch size at `--context` tokens of context: a verification round
   (gamma + 1 = 5 tokens per session) and an edge-only step (1 token per session), for
   batch sizes `--batches`; median of `--repeats` after a warm-up, synchronised;

then the capacity sweep (`python -m benchmarks capacity --device cuda --dtype bfloat16`)
with replay clients, unless `--skip-capacity`.

Without CUDA it exits 2 with the reason. `--device cpu` is the dry run (same code, small
sizes by default with `--quick`), which tests/test_benchmarks_quick.py runs on the tiny
model. Results: gpu.json under --out and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

GAMMA = 4


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def greedy_check(model: Any, prompts: list[list[int]], tokens: int) -> dict[str, Any]:
    """The slot path's greedy decode (all prompts batched, token by token) vs `generate`."""
    import torch

    dev = model._device
    refs = []
    for ids in prompts:
        with torch.inference_mode():
            out = model.model.generate(torch.tensor([ids], device=dev), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=dev),
                                       max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        refs.append(out[0, len(ids):].tolist())
    seqs = [model.new_sequence() for _ in prompts]
    for seq, ids in zip(seqs, prompts):
        seq.reserve(len(ids) + tokens + 1)
        for start in range(0, len(ids) - 1, 64):  # chunked, as the edge prefills
            seq.forward(ids[start : min(start + 64, len(ids) - 1)], keep=0)
    outs: list[list[int]] = [[] for _ in prompts]
    pending = [[ids[-1]] for ids in prompts]
    for _ in range(tokens):
        rows = model.forward_batch(seqs, pending, [1] * len(seqs))
        for i, r in enumerate(rows):
            outs[i].append(int(np.argmax(r[-1])))
            pending[i] = outs[i][-1:]
    for seq in seqs:
        seq.release()
    first = [next((k for k, (a, b) in enumerate(zip(o, r)) if a != b), None) for o, r in zip(outs, refs)]
    return {"prompts": len(prompts), "tokens": tokens, "equal": sum(f is None for f in first),
            "first_divergence": [f for f in first if f is not None]}


def step_times(model: Any, device: str, context: int, batches: list[int], repeats: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    rows = []
    n_max = max(batches)
    seqs = [model.new_sequence() for _ in range(n_max)]
    for seq in seqs:
        seq.reserve(context + GAMMA + 1)
        ids = rng.integers(0, model.n_vocab, context).tolist()
        for start in range(0, context, 512):
            seq.forward(ids[start : start + 512], keep=0)
    for b in batches:
        for name, n_new in (("verify", GAMMA + 1), ("edge-only step", 1)):
            times = []
            for rep in range(repeats + 1):
                new = [rng.integers(0, model.n_vocab, n_new).tolist() for _ in range(b)]
                _sync(device)
                t0 = time.perf_counter()
                model.forward_batch_rows(seqs[:b], new, [n_new] * b)
                _sync(device)
                if rep:
                    times.append(time.perf_counter() - t0)
                for seq in seqs[:b]:
                    seq.rollback(context)
            rows.append({"batch": b, "kind": name, "tokens_per_session": n_new, "context": context,
                         "median_ms": 1000 * statistics.median(times)})
    for seq in seqs:
        seq.release()
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", type=Path, default=None, help="target model (default: the default pair's)")
    p.add_argument("--device", default="cuda", help="torch device (cpu: the dry run)")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--context", type=int, default=1000)
    p.add_argument("--batches", default="1,2,4,8,16,32,64")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small sizes (the CPU dry run)")
    p.add_argument("--skip-capacity", action="store_true")
    p.add_argument("--out", type=Path, default=Path("bench-results/gpu"))


def main(args: argparse.Namespace) -> int:
    import torch

    from edge_service.backends.torch_backend import TorchTargetModel

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device} but CUDA is not available here (torch {torch.__version__}, "
              f"built with CUDA {torch.version.cuda}); run this on a CUDA machine, or --device cpu for the "
              "dry run", file=sys.stderr)
        return 2
    if args.quick:
        args.prompts, args.tokens, args.context, args.batches, args.repeats = 2, 8, 64, "1,4", 1
    if args.target is None:
        from quantize.defaults import default_models

        args.target = default_models().target_gguf
    if args.device == "cpu":
        torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {"device": args.device, "target": str(args.target),
                              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                              "dtypes": {}}
    for dtype in [d for d in args.dtypes.split(",") if d]:
        t0 = time.perf_counter()
        model = TorchTargetModel(args.target, dtype=dtype, device=args.device)
        prompts = [rng.integers(3, min(model.n_vocab, 40_000), int(rng.integers(8, 200))).tolist()
                   for _ in range(args.prompts)]
        greedy = greedy_check(model, prompts, args.tokens)
        steps = step_times(model, args.device, args.context, [int(b) for b in args.batches.split(",")], args.repeats)
        result["dtypes"][dtype] = {"greedy": greedy, "steps": steps, "seconds": time.perf_counter() - t0}
        print(f"## {dtype} on {args.device}: greedy equal to generate {greedy['equal']}/{greedy['prompts']}"
              + (f" (first divergences at {greedy['first_divergence']})" if greedy["first_divergence"] else ""))
        print("| batch | verify ms (5 tok/session) | edge-only step ms (1 tok/session) |\n|--:|--:|--:|")
        by_b: dict[int, dict[str, float]] = {}
        for r in steps:
            by_b.setdefault(r["batch"], {})[r["kind"]] = r["median_ms"]
        for b, d in by_b.items():
            print(f"| {b} | {d['verify']:.2f} | {d['edge-only step']:.2f} |")
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    if not args.skip_capacity:
        from benchmarks import capacity

        rc = capacity.main(["--device", args.device, "--dtype", "bfloat16" if args.device != "cpu" else "float32",
                            "--target", str(args.target), "--sessions", "1,4,16,32", "--tokens", "64",
                            "--prompts", "8", "--out", str(args.out / "capacity")])
        if rc:
            return rc
    print(f"results in {args.out}/ (gpu.json{', capacity/' if not args.skip_capacity else ''})", file=sys.stderr)
    return 0
