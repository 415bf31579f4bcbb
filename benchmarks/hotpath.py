"""`python -m benchmarks hotpath`: the host work around the models, before and after issue 18.

Four measurements in one run, one thread, medians of `--repeats` repeats:

* edge: host time per batched round *excluding the forward*, batch 1/4/16, gamma 4,
  V = 49,152 / 151,936 / 262,144, synthetic logits (normal, sd 3; half the rounds draft
  the argmax so that bonuses happen too), default settings (T 0.7, top-k 40, top-p 0.95).
  Paths: `numpy-before` (main before issue 18: every row through the previous numpy
  transform, `edge_verify`, the downlink from the dense row; benchmarks/sampling_before.py),
  `numpy` (the same with today's protocol.sampling: the ONNX backend's path) and `torch`
  (edge_service.torch_verify, what the torch backend's scheduler runs), each including
  the downlink encoding of its rejections;
* device: the transform and draw per draft token at the same vocabularies, before
  (previous transform + `sample` over the dense row) and after (`protocol.sampling.draw`);
* device-only tokens/s of the runtime against a bare llama-cpp-python eval loop (eval,
  read the logits, argmax) on the same GGUF and thread count, greedy, interleaved;
* the edge's peak RSS growth for a 2,000-token prompt on the default target: before (one
  forward returning every row's logits, as main's prefill did) and after (the session's
  prefill: chunks, no logits), each in a fresh subprocess (VmHWM after clear_refs).

Writes hotpath.csv and hotpath.png to --out and prints a markdown summary.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from protocol.downlink import encode_rejection
from protocol.logprobs import OFF as LOGPROBS_OFF
from protocol.sampling import SamplingParams, draw, probabilities
from protocol.verification import VerdictKind, edge_verify

DEFAULT_SETTINGS = SamplingParams(0.7, top_k=40, top_p=0.95)
VOCABS = (49_152, 151_936, 262_144)
BATCHES = (1, 4, 16)
GAMMA = 4
PROMPT_TOKENS = 2000


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- edge: host time per batched round ------------------------------------------------------


def _rounds(v: int, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(batch, gamma + 1, V) logits, drafts and q values; every other round drafts the argmax."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (batch, GAMMA + 1, v)).astype(np.float32)
    drafts = rng.integers(0, v, (batch, GAMMA))
    drafts[::2] = logits[::2, :GAMMA].argmax(axis=2)
    q = rng.uniform(0.05, 0.5, (batch, GAMMA)).astype(np.float32)
    return logits, drafts, q


def _numpy_round(transform: Callable[..., np.ndarray], logits: np.ndarray, drafts: np.ndarray, q: np.ndarray,
                 buf: np.ndarray) -> None:
    """main's EdgeSession.finish_verify math for a batch: per round, all rows to the host."""
    for i in range(logits.shape[0]):
        rng = np.random.default_rng(i)
        p = transform(logits[i], DEFAULT_SETTINGS, out=buf)
        v = edge_verify(p, drafts[i], q[i], rng)
        if v.kind is VerdictKind.RESAMPLE:
            encode_rejection(v, p[v.n_accepted], "auto", 0, rng)


def _torch_round(logits_t: Any, drafts: np.ndarray, q: np.ndarray) -> None:
    """The torch backend's batched path: edge_service.torch_verify plus the downlink."""
    from edge_service.session import PreparedRound
    from edge_service.torch_verify import verify_rounds

    batch = drafts.shape[0]
    preps = [PreparedRound(SimpleNamespace(q_draft=q[i], q_rows=None, n_candidates=0),  # type: ignore[arg-type]
                           SimpleNamespace(sampling=DEFAULT_SETTINGS, mode="dssd", rng=np.random.default_rng(i),
                                           logprobs=LOGPROBS_OFF, constraint=None),
                           [], drafts[i], [], 0.0) for i in range(batch)]
    for prep, (verdict, support) in zip(preps, verify_rounds(preps, logits_t, [GAMMA + 1] * batch)):
        if verdict.kind is VerdictKind.RESAMPLE:
            encode_rejection(verdict, support, "auto", 0, prep.request.rng)


def edge_host_times(repeats: int) -> list[dict[str, Any]]:
    import torch

    from benchmarks import sampling_before as before

    rows = []
    for v in VOCABS:
        buf = np.empty((GAMMA + 1, v), np.float32)
        for batch in BATCHES:
            logits, drafts, q = _rounds(v, batch, seed=v + batch)
            logits_t = torch.from_numpy(logits.reshape(-1, v))
            paths = {
                "numpy-before": lambda: _numpy_round(before.probabilities, logits, drafts, q, buf),
                "numpy": lambda: _numpy_round(probabilities, logits, drafts, q, buf),
                "torch": lambda: _torch_round(logits_t, drafts, q),
            }
            for fn in paths.values():
                fn()  # warm-up
            for name, fn in paths.items():
                ms = _median_s(fn, repeats) * 1e3
                rows.append({"section": "edge_round", "vocab": v, "batch": batch, "path": name,
                             "value": ms, "unit": "ms per batched round"})
            print(f"edge V={v} batch={batch}: " + ", ".join(
                f"{r['path']} {r['value']:.2f} ms" for r in rows[-3:]), file=sys.stderr)
    return rows


# -- device: transform + draw per draft token -------------------------------------------------


def device_transform_times(repeats: int, tokens: int = 20) -> list[dict[str, Any]]:
    from benchmarks import sampling_before as before
    from protocol.sampling import sample

    rows = []
    for v in VOCABS:
        logits = np.random.default_rng(v).normal(0, 3, (tokens, v)).astype(np.float32)
        out = np.empty(v, np.float32)
        rng = np.random.default_rng(0)

        def old() -> None:
            for row in logits:
                sample(before.probabilities(row, DEFAULT_SETTINGS, out=out), rng)

        def new() -> None:
            for row in logits:
                draw(row, DEFAULT_SETTINGS, rng, out)

        old(), new()
        for name, fn in (("before", old), ("after", new)):
            rows.append({"section": "device_token", "vocab": v, "batch": 1, "path": name,
                         "value": _median_s(fn, repeats) * 1e3 / tokens, "unit": "ms per draft token"})
        print(f"device V={v}: before {rows[-2]['value']:.3f} ms, after {rows[-1]['value']:.3f} ms", file=sys.stderr)
    return rows


# -- device-only against a bare eval loop -------------------------------------------------------


def device_only_rates(draft: Path, repeats: int, tokens: int = 96) -> list[dict[str, Any]]:
    from device_runtime.drafter import LlamaDrafter
    from device_runtime.llama_adapter import LlamaModel
    from device_runtime.session import DeviceClient, GenerationConfig

    drafter = LlamaDrafter(draft, n_ctx=1024, n_threads=1)
    prompt = drafter.tokenize("Write a short story about a lighthouse keeper.", add_bos=False)
    client = DeviceClient(drafter)
    config = GenerationConfig(mode="device-only", max_new_tokens=tokens, sampling=SamplingParams(0.0))
    eos = set(drafter.eos_token_ids)

    def ours() -> float:
        t0 = time.perf_counter()
        result = asyncio.run(client.generate(prompt, config))
        return len(result.ids) / (time.perf_counter() - t0)

    model = LlamaModel.open(draft, n_ctx=1024, n_threads=1)  # the same GGUF and settings, its own context

    def bare() -> float:
        t0 = time.perf_counter()
        keep = min(model.llm.n_tokens, len(prompt) - 1)  # the prompt's cache reused, as the drafter does
        model.truncate(keep)
        model.llm.eval(prompt[keep:])
        n = 0
        while n < tokens:
            tok = int(np.argmax(model.last_logits()))
            n += 1
            if tok in eos:
                break
            model.llm.eval([tok])
        return n / (time.perf_counter() - t0)

    ours(), bare()
    samples: dict[str, list[float]] = {"device-only": [], "bare-eval-loop": []}
    for _ in range(repeats):  # interleaved, so that machine noise hits both alike
        samples["device-only"].append(ours())
        samples["bare-eval-loop"].append(bare())
    drafter.close()
    model.close()
    rows = [{"section": "device_only", "vocab": drafter.n_vocab, "batch": 1, "path": k,
             "value": statistics.median(v), "unit": "tokens/s"} for k, v in samples.items()]
    print(f"device-only {rows[0]['value']:.1f} tok/s, bare loop {rows[1]['value']:.1f} tok/s", file=sys.stderr)
    return rows


# -- edge: peak RSS of a long prefill -------------------------------------------------------------


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def prefill_rss(target: Path, variant: str, n_tokens: int = PROMPT_TOKENS) -> dict[str, float]:
    """Peak RSS growth (MB) of one prefill in this process: `before` (one forward, every
    row's logits to the host) or `after` (EdgeSession's prefill)."""
    import torch

    from edge_service.backends.torch_backend import TorchTargetModel
    from edge_service.session import PREFILL_CHUNK

    torch.set_num_threads(1)
    model = TorchTargetModel(target, threads=1)
    ids = np.random.default_rng(0).integers(100, min(model.n_vocab, 40_000), n_tokens).tolist()
    warm = model.new_sequence()
    warm.forward(ids[:16], keep=0)  # warm the kernels and the allocator
    warm.release()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rss0 = _status_mb("VmRSS")
    seq = model.new_sequence()
    if variant == "before":
        seq.forward(ids)
    else:  # what a Start runs: the request's KV reserved, the prompt in chunks, no logits
        seq.reserve(n_tokens)
        for start in range(0, n_tokens, PREFILL_CHUNK):
            seq.forward(ids[start : start + PREFILL_CHUNK], keep=0)
    return {"peak_growth_mb": _status_mb("VmHWM") - rss0, "retained_mb": _status_mb("VmRSS") - rss0}


def prefill_rss_rows(target: Path) -> list[dict[str, Any]]:
    rows = []
    for variant in ("before", "after"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.hotpath", "--rss-child", variant, "--target", str(target)],
                             capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        got = json.loads(out.stdout.strip().splitlines()[-1])
        for key, value in got.items():
            rows.append({"section": "prefill_rss", "vocab": 0, "batch": PROMPT_TOKENS, "path": f"{variant}:{key}",
                         "value": value, "unit": "MB"})
        print(f"prefill {PROMPT_TOKENS} tokens {variant}: {got}", file=sys.stderr)
    return rows


# -- output ---------------------------------------------------------------------------------------


def _value(rows: list[dict[str, Any]], section: str, path: str, vocab: int | None = None, batch: int | None = None) -> float:
    for r in rows:
        if r["section"] == section and r["path"] == path and vocab in (None, r["vocab"]) and batch in (None, r["batch"]):
            return float(r["value"])
    return float("nan")


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["Edge host time per batched round, excluding the forward (ms; gamma 4, T 0.7 / top-k 40 / top-p 0.95)", "",
             "| V | batch | numpy before | numpy now | torch | before / torch |", "|---:|---:|---:|---:|---:|---:|"]
    for v in VOCABS:
        for b in BATCHES:
            old, new, tch = (_value(rows, "edge_round", p, v, b) for p in ("numpy-before", "numpy", "torch"))
            if not np.isnan(old):
                lines.append(f"| {v:,} | {b} | {old:.2f} | {new:.2f} | {tch:.2f} | {old / tch:.1f}x |")
    lines += ["", "Device transform + draw per draft token (ms, same settings)", "",
              "| V | before | after | before / after |", "|---:|---:|---:|---:|"]
    for v in VOCABS:
        old, new = _value(rows, "device_token", "before", v), _value(rows, "device_token", "after", v)
        if not np.isnan(old):
            lines.append(f"| {v:,} | {old:.3f} | {new:.3f} | {old / new:.1f}x |")
    ours, bare = _value(rows, "device_only", "device-only"), _value(rows, "device_only", "bare-eval-loop")
    if not np.isnan(ours):
        lines += ["", f"device-only {ours:.1f} tok/s, bare llama-cpp-python eval loop {bare:.1f} tok/s "
                      f"({ours / bare:.2f}x), greedy, 1 thread"]
    before, after = _value(rows, "prefill_rss", "before:peak_growth_mb"), _value(rows, "prefill_rss", "after:peak_growth_mb")
    if not np.isnan(before):
        kept_b, kept_a = (_value(rows, "prefill_rss", f"{v}:retained_mb") for v in ("before", "after"))
        lines += ["", f"Prefill of {PROMPT_TOKENS} tokens, default target: peak RSS +{before:.0f} MB before, "
                      f"+{after:.0f} MB after (retained afterwards: {kept_b:.0f} / {kept_a:.0f} MB, the KV cache)"]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.plots import save_figure

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    paths = ("numpy-before", "numpy", "torch")
    labels = [f"{v // 1000}k/b{b}" for v in VOCABS for b in BATCHES]
    x = np.arange(len(labels))
    for k, p in enumerate(paths):
        ax1.bar(x + (k - 1) * 0.27, [_value(rows, "edge_round", p, v, b) for v in VOCABS for b in BATCHES], 0.27, label=p)
    ax1.set_yscale("log")
    ax1.set_xticks(x, labels, rotation=45)
    ax1.set_ylabel("ms per batched round (host, no forward)")
    ax1.legend()
    ax1.set_title("edge, gamma 4")
    xv = np.arange(len(VOCABS))
    for k, p in enumerate(("before", "after")):
        ax2.bar(xv + (k - 0.5) * 0.4, [_value(rows, "device_token", p, v) for v in VOCABS], 0.4, label=p)
    ax2.set_xticks(xv, [f"{v:,}" for v in VOCABS])
    ax2.set_yscale("log")
    ax2.set_ylabel("ms per draft token")
    ax2.legend()
    ax2.set_title("device transform + draw")
    return save_figure(fig, path, title="hot path: T 0.7, top-k 40, top-p 0.95, 1 thread")


def run(out: Path, repeats: int, target: Path | None, draft: Path | None, skip: set[str]) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    if "edge" not in skip:
        rows += edge_host_times(repeats)
    if "device" not in skip:
        rows += device_transform_times(repeats)
    if "device-only" not in skip and draft is not None:
        rows += device_only_rates(draft, repeats)
    if "rss" not in skip and target is not None:
        rows += prefill_rss_rows(target)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "hotpath.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["section", "vocab", "batch", "path", "value", "unit"])
        writer.writeheader()
        writer.writerows(rows)
    if "edge" not in skip and "device" not in skip:
        plot(rows, out / "hotpath.png")
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("bench-results/hotpath"))
    p.add_argument("--repeats", type=int, default=5, help="repeats per measurement (medians)")
    p.add_argument("--target", type=Path, default=None, help="edge target for the RSS measurement (default pair)")
    p.add_argument("--draft", type=Path, default=None, help="draft GGUF for device-only (default: the Q4_0 draft)")
    p.add_argument("--skip", type=lambda s: set(s.split(",")), default=set(),
                   help="comma list of edge, device, device-only, rss")


def main(args: argparse.Namespace) -> int:
    from quantize.defaults import default_models

    d = default_models()
    target = args.target or d.target_gguf
    draft = args.draft or d.draft_q4_0_gguf
    rows = run(args.out, args.repeats, Path(target) if Path(target).exists() else None,
               Path(draft) if Path(draft).exists() else None, args.skip)
    print(markdown(rows))
    print(f"results in {args.out}/ (hotpath.csv, hotpath.png)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hotpath", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--rss-child", choices=("before", "after"), help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.rss_child:
        print(json.dumps(prefill_rss(ns.target, ns.rss_child)))
        sys.exit(0)
    sys.exit(main(ns))
