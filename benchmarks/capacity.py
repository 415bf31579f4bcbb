"""Edge capacity: N concurrent device sessions against one edge, batching on vs off.

    python -m benchmarks.capacity [--sessions 1,2,4,8,16] [--tokens 64] [--runs 1] ...

Setup (default pair: Q4_1 GGUF target in fp32 on the edge, Q4_0 draft):

* two real edges, `python -m edge_service --threads 1` subprocesses on loopback, one with
  cross-session batching (default window/max batch) and one with `--no-batching`; both
  stay up for the whole run, and every N runs on both, back to back (order alternating),
  so the ratio comes from measurements taken side by side;
* the load comes from **replay clients**, not live drafters: on a 2-core machine N
  llama.cpp devices would steal the edge's CPU. Before the runs, the real draft model
  (llama.cpp, one thread) drafts gamma tokens greedily after every prefix of the target's
  greedy continuation of each prompt (the continuation itself comes from the edge in
  edge-only mode). Under greedy decoding the committed sequence is always a prefix of that
  continuation (the output is exact), so at any committed length the recorded draft is
  exactly what the real device would send. Each replay client speaks the real protocol over
  a real WebSocket (Hello, Start, Draft/Verdict rounds, End/Done) with no drafting delay
  (`--device-ms-per-token` emulates one); its output is checked against the continuation.

Reported per N and mode: per-device tokens/s (each device's generated tokens over its
request's wall time, Start to Done, prefill included; mean over devices), the edge's
aggregate verified tokens/s (all sessions' committed tokens over the makespan), the mean
batch size from the edge's /metrics, and the batching speedup. Medians over `--runs`.
Writes capacity.json, capacity.csv and capacity.png (matplotlib, Agg) under `--out`.
Absolute numbers on a shared 2-core machine are noisy; read the on/off ratio.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from protocol import wire
from protocol.sampling import SamplingParams

log = logging.getLogger("benchmarks.capacity")

GREEDY = SamplingParams(0.0)
QUESTIONS = (
    "Explain how a refrigerator works, step by step.",
    "Write a short story about a robot who learns to paint.",
    "What are the main causes of the French Revolution?",
    "Describe the water cycle in detail.",
    "Give me ten tips for learning a new language.",
    "Why is the sky blue? Explain it to a child.",
    "Write a letter to a friend about a trip to the mountains.",
    "How do vaccines train the immune system?",
    "Compare cats and dogs as pets.",
    "Describe a busy market in a large city.",
    "What is photosynthesis and why does it matter?",
    "Write a poem about the ocean at night.",
    "How does a computer store numbers?",
    "Explain the rules of chess briefly.",
    "What should I pack for a week of camping?",
    "Tell me about the history of the bicycle.",
)


# -- recording: the drafts the real draft model would send ---------------------------


@dataclass
class PromptTrace:
    text: str
    ids: list[int]
    ref: list[int]  # the target's greedy continuation (from the edge, edge-only mode)
    table: list[list[int]]  # table[g]: the draft model's greedy gamma tokens after ids + ref[:g]


@dataclass
class Trace:
    target: str
    draft: str
    tokens: int
    gamma: int
    fingerprint: str
    n_vocab: int
    eos_ids: list[int]
    prompts: list[PromptTrace]


async def _reference(url: str, hello: wire.Hello, ids: list[int], tokens: int) -> tuple[list[int], list[int]]:
    from device_runtime.transport import EdgeLink

    link = await EdgeLink.connect(url, hello)
    try:
        await link.send(wire.Start(mode="edge-only", sampling=GREEDY, seed=0, max_new_tokens=tokens,
                                   prompt_ids=np.asarray(ids, np.int32)))
        out: list[int] = []
        while True:
            msg = await link.recv(wire.Tokens, timeout=600)
            out.extend(int(t) for t in msg.ids)
            if msg.done:
                break
        await link.send(wire.End(len(ids) + len(out)))
        await link.recv(wire.Done, timeout=60)
        return out, list(link.welcome.eos_token_ids)
    finally:
        await link.close()


def record_trace(url: str, target: Path, draft: Path, n_prompts: int, tokens: int, gamma: int) -> Trace:
    """Greedy continuations from the edge, then the real draft model's draft at every prefix."""
    from device_runtime.drafter import LlamaDrafter

    drafter = LlamaDrafter(draft, n_ctx=2048, n_threads=1)
    try:
        fp = drafter.vocabulary.fingerprint  # of the real tokens, as DeviceClient sends it
        hello = wire.Hello(wire.VERSION, fp, drafter.n_vocab, "capacity-recorder")
        prompts = []
        eos_ids: list[int] = []
        rng = np.random.default_rng(0)
        for q in QUESTIONS[:n_prompts]:
            text = drafter.chat_prompt([{"role": "user", "content": q}])
            ids = drafter.tokenize(text, add_bos=False)
            t0 = time.perf_counter()
            ref, eos_ids = asyncio.run(_reference(url, hello, ids, tokens))
            t1 = time.perf_counter()
            table = [drafter.draft(ids + ref[:g], gamma, GREEDY, rng).ids.tolist() for g in range(len(ref))]
            log.info("recorded %r: %d tokens (edge %.1f s), %d drafts (device %.1f s)",
                     q[:40], len(ref), t1 - t0, len(table), time.perf_counter() - t1)
            prompts.append(PromptTrace(text, ids, ref, table))
        return Trace(target.name, draft.name, tokens, gamma, fp, drafter.n_vocab, eos_ids, prompts)
    finally:
        drafter.close()


def load_or_record(path: Path | None, url: str, args: argparse.Namespace) -> Trace:
    if path is not None and path.is_file():
        d = json.loads(path.read_text())
        trace = Trace(**{**d, "prompts": [PromptTrace(**p) for p in d["prompts"]]})
        if (trace.target, trace.draft, trace.tokens, trace.gamma) == (
            args.target.name, args.draft.name, args.tokens, args.gamma
        ) and len(trace.prompts) >= args.prompts:
            trace.prompts = trace.prompts[: args.prompts]
            log.info("using recorded drafts from %s", path)
            return trace
        log.info("%s was recorded with other settings: recording again", path)
    trace = record_trace(url, args.target, args.draft, args.prompts, args.tokens, args.gamma)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(trace)))
    return trace


# -- replay clients -------------------------------------------------------------------


@dataclass
class DeviceRun:
    tokens: int
    rounds: int
    drafted: int
    accepted: int
    wall_s: float
    t_start: float
    t_end: float
    exact: bool
    ttft_s: float = 0.0  # Start sent to the first generated token received


async def replay(url: str, trace: Trace, p: PromptTrace, device_s_per_token: float) -> DeviceRun:
    """One device session: the recorded drafts over the real protocol, greedy."""
    from device_runtime.transport import EdgeLink

    hello = wire.Hello(wire.VERSION, trace.fingerprint, trace.n_vocab, "capacity-replay")
    link = await EdgeLink.connect(url, hello)
    eos = set(trace.eos_ids)
    try:
        t0 = time.perf_counter()
        await link.send(wire.Start(mode="dssd", sampling=GREEDY, seed=0, max_new_tokens=trace.tokens,
                                   prompt_ids=np.asarray(p.ids, np.int32)))
        gen: list[int] = []
        rounds = drafted = accepted = 0
        done = False
        while not done:
            g = len(gen)
            gamma = min(trace.gamma, trace.tokens - g - 1)
            draft = (p.table[g] if g < len(p.table) else [0] * trace.gamma)[:gamma]
            if device_s_per_token and gamma:
                await asyncio.sleep(device_s_per_token * gamma)
            rounds += 1
            drafted += gamma
            await link.send(wire.Draft(len(p.ids) + g, np.zeros(0, np.int32), np.asarray(draft, np.int32)),
                            round=rounds)
            verdict = await link.recv(wire.VerdictMsg, timeout=600)
            if rounds == 1:
                ttft = time.perf_counter() - t0
            j = verdict.n_accepted
            accepted += j
            for tok in draft[:j] + [verdict.token]:
                gen.append(int(tok))
                if tok in eos or len(gen) >= trace.tokens:
                    done = True
                    break
        await link.send(wire.End(len(p.ids) + len(gen)))
        await link.recv(wire.Done, timeout=60)
        t1 = time.perf_counter()
        return DeviceRun(len(gen), rounds, drafted, accepted, t1 - t0, t0, t1, gen == p.ref[: len(gen)], ttft)
    finally:
        await link.close()


async def stream_edge_only(url: str, trace: Trace, p: PromptTrace) -> DeviceRun:
    """One device streaming from the edge alone (edge-only mode: the batched baseline)."""
    from device_runtime.transport import EdgeLink

    hello = wire.Hello(wire.VERSION, trace.fingerprint, trace.n_vocab, "capacity-edge-only")
    link = await EdgeLink.connect(url, hello)
    try:
        t0 = time.perf_counter()
        await link.send(wire.Start(mode="edge-only", sampling=GREEDY, seed=0, max_new_tokens=trace.tokens,
                                   prompt_ids=np.asarray(p.ids, np.int32)))
        gen: list[int] = []
        ttft = 0.0
        while True:
            msg = await link.recv(wire.Tokens, timeout=600)
            if not gen:
                ttft = time.perf_counter() - t0
            gen.extend(int(t) for t in msg.ids)
            if msg.done:
                break
        await link.send(wire.End(len(p.ids) + len(gen)))
        await link.recv(wire.Done, timeout=60)
        t1 = time.perf_counter()
        return DeviceRun(len(gen), len(gen), 0, 0, t1 - t0, t0, t1, gen == p.ref[: len(gen)], ttft)
    finally:
        await link.close()


async def _run_n(url: str, trace: Trace, n: int, device_s_per_token: float, mode: str = "dssd") -> list[DeviceRun]:
    prompts = [trace.prompts[i % len(trace.prompts)] for i in range(n)]
    if mode == "edge-only":
        return list(await asyncio.gather(*(stream_edge_only(url, trace, p) for p in prompts)))
    return list(await asyncio.gather(*(replay(url, trace, p, device_s_per_token) for p in prompts)))


# -- edges ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EdgeProcess:
    """`python -m edge_service` in a subprocess, with /metrics on a free port."""

    def __init__(self, target: Path, extra: Sequence[str], threads: int, log_path: Path) -> None:
        self.metrics_port = _free_port()
        cmd = [sys.executable, "-m", "edge_service", "--model", str(target), "--port", "0",
               "--threads", str(threads), "--max-sessions", "128", "--metrics-port", str(self.metrics_port),
               "--idle-timeout", "3600", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
                                     cwd=Path(__file__).resolve().parent.parent)
        self.url = ""
        self.cmd = cmd

    def wait_ready(self, timeout: float = 1200.0) -> str:  # a hang guard: loading is slow under load
        from benchmarks.compare import wait_ready

        try:
            self.url = wait_ready(self.proc, timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"edge did not start: {' '.join(self.cmd)} (see {self._log.name}): {exc}") from exc
        return self.url

    def scrape(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30).read().decode()
        return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                if not s.labels}

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


# -- main -----------------------------------------------------------------------------


def measure(edge: EdgeProcess, trace: Trace, n: int, device_s_per_token: float, mode: str = "dssd") -> dict[str, Any]:
    before = edge.scrape()
    runs = asyncio.run(_run_n(edge.url, trace, n, device_s_per_token, mode))
    after = edge.scrape()
    makespan = max(r.t_end for r in runs) - min(r.t_start for r in runs)
    tokens = sum(r.tokens for r in runs)
    batches = after["dssd_verify_batch_size_count"] - before["dssd_verify_batch_size_count"]
    rounds = after["dssd_verify_batch_size_sum"] - before["dssd_verify_batch_size_sum"]
    forward_s = after["dssd_batch_forward_seconds_sum"] - before["dssd_batch_forward_seconds_sum"]
    per_device = np.array([r.tokens / r.wall_s for r in runs])
    ttft = np.array([r.ttft_s for r in runs])
    return {
        "tokens": tokens,
        "makespan_s": makespan,
        "aggregate_tps": tokens / makespan,
        "per_device_tps": float(per_device.mean()),
        "per_device_tps_p50": float(np.percentile(per_device, 50)),
        # what 90% of the devices reached at least (the 10th percentile of the rates)
        "per_device_tps_p90": float(np.percentile(per_device, 10)),
        "ttft_p50_ms": 1000 * float(np.percentile(ttft, 50)),
        "ttft_p90_ms": 1000 * float(np.percentile(ttft, 90)),
        "rounds": sum(r.rounds for r in runs),
        "acceptance": sum(r.accepted for r in runs) / max(1, sum(r.drafted for r in runs)),
        "mean_batch": rounds / batches if batches else 0.0,
        # forwards carrying rounds or edge-only steps (with any prefill piece riding in
        # them; forwards of prefill pieces alone are not counted)
        "forwards": batches,
        "forward_s_per_batch": forward_s / batches if batches else 0.0,
        # share of the makespan the edge spent in batched forwards (the rest: prefill-only
        # forwards, verification math, I/O, idle)
        "forward_share": forward_s / makespan,
        "not_exact": sum(not r.exact for r in runs),
    }


def slo_capacity(summary: list[dict[str, Any]], mode: str, floor_tps: float, ttft_ms: float) -> int:
    """N*: the largest N of the sweep at which `mode` meets the SLO at every N up to it."""
    best = 0
    for row in sorted((r for r in summary if r["mode"] == mode), key=lambda r: r["sessions"]):
        if row["per_device_tps_p90"] >= floor_tps and row["ttft_p90_ms"] <= ttft_ms:
            best = row["sessions"]
        else:
            break
    return best


def projection(summary: list[dict[str, Any]], gamma: int) -> dict[str, Any]:
    """The DSSD / batched edge-only capacity ratio from measured components, on this edge
    and on one where a forward over a batch's gamma + 1 tokens per session costs what one
    token per session costs (a GPU at these batch sizes: memory-bound, the weights read
    once per forward dominate).

    At saturation an edge runs forwards back to back; DSSD commits E[tokens per round]
    per session per forward, edge-only 1. So capacity ratio = E * t_step / t_verify with
    t_step, t_verify the measured seconds per batched forward at the same batch size.
    """
    from protocol.costmodel import expected_tokens_per_round

    dssd = [r for r in summary if r["mode"] == "dssd"]
    eo = {r["sessions"]: r for r in summary if r["mode"] == "edge-only"}
    acceptance = statistics.median(r["acceptance"] for r in dssd) if dssd else 0.0
    e_tokens = expected_tokens_per_round(min(acceptance, 0.999), gamma)
    top = max((r for r in dssd if r["sessions"] in eo), key=lambda r: r["sessions"], default=None)
    out: dict[str, Any] = {"acceptance": acceptance, "expected_tokens_per_round": e_tokens}
    if top is not None and top["forward_s_per_batch"] and eo[top["sessions"]]["forward_s_per_batch"]:
        t_verify, t_step = top["forward_s_per_batch"], eo[top["sessions"]]["forward_s_per_batch"]
        out.update(at_sessions=top["sessions"], t_verify_s=t_verify, t_step_s=t_step,
                   measured_model_ratio=e_tokens * t_step / t_verify,
                   gpu_projection_ratio=e_tokens)  # t_verify ~= t_step when the forward is memory-bound
    return out


def plot(summary: list[dict[str, Any]], path: Path, title: str, floor_tps: float) -> None:
    from benchmarks.plots import plt, save_figure

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for mode, style in (("dssd", "o-"), ("edge-only", "s--")):
        rows = [r for r in summary if r["mode"] == mode]
        ns = [r["sessions"] for r in rows]
        ax1.plot(ns, [r["aggregate_tps"] for r in rows], style, label=f"{mode} (batched)")
        ax2.plot(ns, [r["per_device_tps_p90"] for r in rows], style, label=f"{mode} p90")
        ax2.plot(ns, [r["per_device_tps_p50"] for r in rows], style, alpha=0.4, label=f"{mode} p50")
        ax3.plot(ns, [r["ttft_p90_ms"] for r in rows], style, label=f"{mode} p90")
    ax2.axhline(floor_tps, color="grey", lw=0.8, ls=":", label="SLO floor")
    ax3.axhline(500, color="grey", lw=0.8, ls=":", label="SLO 500 ms")
    for ax, ylabel in ((ax1, "edge aggregate tokens/s"), (ax2, "per-device tokens/s"),
                       (ax3, "time to first token (ms)")):
        ax.set_xscale("log", base=2)
        ns = sorted({r["sessions"] for r in summary})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("concurrent device sessions")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, title=title, title_size=10, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    from dssd_common.models import default_models

    d = default_models()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks capacity",
        description="Edge capacity with N concurrent devices: DSSD (batched verification) against batched "
                    "edge-only streaming from the same edge, one run.",
    )
    p.add_argument("--target", type=Path, default=d.target_gguf, help="edge target (GGUF or HF dir)")
    p.add_argument("--draft", type=Path, default=d.draft_q4_0_gguf, help="draft GGUF used to record the drafts")
    p.add_argument("--sessions", default="1,2,4,8,16", help="comma-separated N values")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per device request")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8, help="distinct prompts (sessions reuse them in turn)")
    p.add_argument("--runs", type=int, default=1, help="repetitions per (N, mode); medians are reported")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the edge process")
    p.add_argument("--device", default="cpu", help="the edge's torch device (cuda for the GPU check)")
    p.add_argument("--dtype", default="float32", help="the edge's torch dtype")
    p.add_argument("--batch-window-ms", type=float, default=3.0)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--device-ms-per-token", type=float, default=0.0,
                   help="emulated drafting time per draft token on each device (0: none)")
    p.add_argument("--slo-tps", type=float, default=2.0,
                   help="SLO floor: tokens/s that 90%% of the devices must reach")
    p.add_argument("--slo-ttft-ms", type=float, default=500.0, help="SLO: p90 time to first token")
    p.add_argument("--trace", type=Path, default=None,
                   help="recorded drafts (JSON); reused when it matches, else recorded and saved here "
                        "(default: OUT/trace.json)")
    p.add_argument("--out", type=Path, default=Path("bench-results/capacity"))
    p.add_argument("-v", "--verbose", action="store_true")
    return p


MODES = ("dssd", "edge-only")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for path in (args.target, args.draft):
        if not path.exists():
            print(f"error: {path} not found (python -m quantize prepare-default)", file=sys.stderr)
            return 2
    sessions = [int(x) for x in args.sessions.split(",") if x]
    args.out.mkdir(parents=True, exist_ok=True)
    flags = ["--batch-window-ms", str(args.batch_window_ms), "--max-batch", str(args.max_batch),
             "--device", args.device, "--dtype", args.dtype]
    with ExitStack() as stack:
        edge = EdgeProcess(args.target, flags, args.threads, args.out / "edge.log")
        stack.callback(edge.close)
        edge.wait_ready()
        log.info("edge up at %s (batched verification and batched edge-only steps)", edge.url)
        trace = load_or_record(args.trace or args.out / "trace.json", edge.url, args)
        for mode in MODES:  # warm-up: first forwards allocate
            measure(edge, trace, 2, 0.0, mode)
        raw = []
        for rep in range(args.runs):
            for i, n in enumerate(sessions):
                for mode in (MODES if (rep + i) % 2 == 0 else MODES[::-1]):
                    res = measure(edge, trace, n, args.device_ms_per_token / 1000.0, mode)
                    res.update(sessions=n, mode=mode, run=rep)
                    raw.append(res)
                    log.info("N=%2d %-9s: aggregate %6.1f tok/s, per device p50 %5.1f p90 %5.1f tok/s, "
                             "TTFT p90 %4.0f ms, mean batch %.2f, %.3f s/forward, acceptance %.2f, not exact %d",
                             n, mode, res["aggregate_tps"], res["per_device_tps_p50"], res["per_device_tps_p90"],
                             res["ttft_p90_ms"], res["mean_batch"], res["forward_s_per_batch"], res["acceptance"],
                             res["not_exact"])
    keys = ("aggregate_tps", "per_device_tps", "per_device_tps_p50", "per_device_tps_p90", "ttft_p50_ms",
            "ttft_p90_ms", "mean_batch", "forward_s_per_batch", "acceptance", "forward_share")
    summary = []
    for n in sessions:
        for mode in MODES:
            rows = [r for r in raw if r["sessions"] == n and r["mode"] == mode]
            summary.append({"sessions": n, "mode": mode, **{k: statistics.median(r[k] for r in rows) for k in keys},
                            "not_exact": sum(r["not_exact"] for r in rows)})
    for row in summary:
        if row["mode"] == "dssd":
            eo = next(r for r in summary if r["sessions"] == row["sessions"] and r["mode"] == "edge-only")
            row["ratio_vs_edge_only"] = row["aggregate_tps"] / eo["aggregate_tps"]
    capacity = {m: slo_capacity(summary, m, args.slo_tps, args.slo_ttft_ms) for m in MODES}
    proj = projection(summary, args.gamma)
    meta = {
        "target": str(args.target), "draft": str(args.draft), "tokens": args.tokens, "gamma": args.gamma,
        "prompts": args.prompts, "runs": args.runs, "threads": args.threads, "device": args.device,
        "dtype": args.dtype, "batch_window_ms": args.batch_window_ms, "max_batch": args.max_batch,
        "device_ms_per_token": args.device_ms_per_token,
        "slo": {"p90_per_device_tps_floor": args.slo_tps, "p90_ttft_ms": args.slo_ttft_ms},
        "load": "replay clients: drafts recorded from the real draft model, sent over the real protocol; "
                "edge-only clients stream from the same edge",
        "cpu_count": os.cpu_count(),
    }
    result = {"meta": meta, "summary": summary, "capacity": capacity, "projection": proj, "runs": raw}
    (args.out / "capacity.json").write_text(json.dumps(result, indent=1))
    with open(args.out / "capacity.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(k for row in summary for k in row))
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(summary)
    title = (f"{args.target.name} edge ({args.device}, {args.threads} thread), replayed {args.draft.name} drafts, "
             f"gamma {args.gamma}, {args.tokens} tokens, greedy; N* dssd {capacity['dssd']}, "
             f"edge-only {capacity['edge-only']}")
    plot(summary, args.out / "capacity.png", title, args.slo_tps)
    print(f"{'N':>3} {'mode':>9} {'aggregate tok/s':>16} {'p50 tok/s':>10} {'p90 tok/s':>10} {'TTFT p90 ms':>12} "
          f"{'mean batch':>10} {'vs edge-only':>12}")
    for r in summary:
        ratio = f"{r['ratio_vs_edge_only']:.2f}x" if "ratio_vs_edge_only" in r else ""
        print(f"{r['sessions']:>3} {r['mode']:>9} {r['aggregate_tps']:>16.1f} {r['per_device_tps_p50']:>10.2f} "
              f"{r['per_device_tps_p90']:>10.2f} {r['ttft_p90_ms']:>12.0f} {r['mean_batch']:>10.2f} {ratio:>12}")
    print(f"capacity at the SLO (p90 >= {args.slo_tps:g} tok/s per device, p90 TTFT <= {args.slo_ttft_ms:g} ms): "
          f"dssd N* = {capacity['dssd']}, edge-only N* = {capacity['edge-only']}")
    print(f"projection: {json.dumps(proj)}")
    if any(r["not_exact"] for r in summary):
        print("WARNING: some outputs differ from the target's greedy continuation", file=sys.stderr)
    print(f"wrote {args.out / 'capacity.json'}, capacity.csv, capacity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
