"""Side-by-side comparison of every mode over emulated links, with the cost model beside it.

One benchmark process holds the device (llama.cpp, one thread); the edge runs in a
subprocess (`python -m edge_service --threads 1`) or, for tiny models, in a thread; a
`LinkEmulator` sits between them (loopback: no proxy). For each link profile, each trial
(prompt x seed) and each sampling setting, every mode and gamma runs back to back, in an
order rotated per trial, so ratios come from generations that ran side by side.

Measured per generation: tokens/s, time to first token, acceptance (per position), bytes
up/down (per token and per round, split by message type), and per round: draft time on
the device, time from sending the Draft to receiving the Verdict, and the steady-state
round time (rounds after the first, which also pays both prefills).

Cost-model check: the round time predicted by `protocol.costmodel.round_time` from
components measured elsewhere: t_draft = per-token time of `device-only` on the same
profile and sampling; t_verify = the edge's own compute time per round (its Done stats);
RTT and rates = the profile; bytes = the round's measured Draft/Verdict sizes plus
WebSocket framing. `round_ratio` = measured / predicted shows the implementation's overhead.
"""
from __future__ import annotations

import asyncio
import csv
import json
import logging
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from benchmarks.link import LinkEmulator, LinkProfile
from protocol import costmodel as cm
from protocol.modes import MODES, SPECULATIVE_MODES
from protocol.sampling import SamplingParams

log = logging.getLogger(__name__)

ALL_MODES = MODES  # every mode is compared
SPECULATIVE = SPECULATIVE_MODES

#: Named link profiles (issue 6). RTT is split evenly between the two directions.
PROFILES: dict[str, LinkProfile] = {
    "1mbps-50ms": LinkProfile.from_mbps(1, rtt_ms=50),
    "10mbps-20ms": LinkProfile.from_mbps(10, rtt_ms=20),
    "100mbps-5ms": LinkProfile.from_mbps(100, rtt_ms=5),
    "loopback": LinkProfile("loopback"),
}

#: Named sampling settings. "t1-k10" is the paper's (T 1, top-k 10).
SAMPLINGS: dict[str, SamplingParams] = {
    "greedy": SamplingParams(0.0),
    "t1": SamplingParams(1.0, 0, 1.0),
    "t1-k10": SamplingParams(1.0, 10, 1.0),
}

#: Chat prompts that ask for long answers (EOS early would shorten the measurement).
PROMPTS: tuple[str, ...] = (
    "Write a detailed explanation of how a refrigerator keeps food cold.",
    "Describe, step by step, how to bake a loaf of bread at home.",
    "Explain why the sky is blue, in several paragraphs, for a curious child.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "List and explain ten tips for learning a new programming language.",
    "Explain how the internet delivers a web page to your computer.",
    "Describe the water cycle and why it matters for life on Earth.",
    "Write a letter to a friend describing your favourite city and why you love it.",
)


def parse_profile(spec: str, *, jitter_ms: float = 0.0) -> LinkProfile:
    """A named profile, or 'MBPS/RTT_MS', or 'UP_MBPS:DOWN_MBPS/RTT_MS' (e.g. '10/20', '1:10/50')."""
    if spec in PROFILES:
        p = PROFILES[spec]
        if jitter_ms and not p.is_transparent:
            p = LinkProfile.from_mbps(p.up_mbps, p.down_mbps, rtt_ms=p.rtt_s * 1000, jitter_ms=jitter_ms,
                                      name=spec)
        return p
    m = re.fullmatch(r"([\d.]+|inf)(?::([\d.]+|inf))?/([\d.]+)", spec)
    if not m:
        raise ValueError(f"unknown profile {spec!r}: use one of {sorted(PROFILES)} or MBPS/RTT_MS")

    def rate(x: str | None) -> float | None:
        return None if x in (None, "inf") else float(x)

    up = rate(m.group(1))
    down = rate(m.group(2)) if m.group(2) else up
    return LinkProfile.from_mbps(up, down, rtt_ms=float(m.group(3)), jitter_ms=jitter_ms)


def parse_sampling(spec: str) -> tuple[str, SamplingParams]:
    """'greedy', 't1', 't1-k10', or any 't<T>[-k<K>][-p<P>]' (e.g. 't0.7-k40-p0.95')."""
    if spec in SAMPLINGS:
        return spec, SAMPLINGS[spec]
    m = re.fullmatch(r"t([\d.]+)(?:-k(\d+))?(?:-p([\d.]+))?", spec)
    if not m:
        raise ValueError(f"unknown sampling {spec!r}: use greedy, t1, t1-k10 or t<T>[-k<K>][-p<P>]")
    return spec, SamplingParams(float(m.group(1)), int(m.group(2) or 0), float(m.group(3) or 1.0))


@dataclass
class CompareConfig:
    target: Path
    draft: Path
    out: Path
    profiles: list[LinkProfile] = field(default_factory=lambda: [PROFILES["1mbps-50ms"], PROFILES["loopback"]])
    modes: tuple[str, ...] = ALL_MODES
    gammas: tuple[int, ...] = (4,)
    samplings: list[tuple[str, SamplingParams]] = field(default_factory=lambda: [("t1", SAMPLINGS["t1"])])
    prompts: int = 2
    runs: int = 1  # seeds per prompt
    tokens: int = 64
    mode_tokens: dict[str, int] = field(default_factory=dict)  # per-mode max_new_tokens override
    edge: str = "process"  # "process" | "thread"
    pipeline: bool = True  # the device keeps drafting while a verdict is in flight (runtime default)
    warmup: bool = True
    n_ctx: int = 2048
    plots: bool = True
    progress: bool = True
    title: str = ""

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in ALL_MODES]
        if bad:
            raise ValueError(f"unknown modes {bad}; choose from {ALL_MODES}")
        if not self.gammas or min(self.gammas) < 1:
            raise ValueError("gammas must be >= 1")
        if self.prompts < 1 or self.runs < 1 or self.tokens < 2:
            raise ValueError("need prompts >= 1, runs >= 1, tokens >= 2")
        if self.prompts > len(PROMPTS):
            raise ValueError(f"at most {len(PROMPTS)} prompts")
        if self.edge not in ("process", "thread"):
            raise ValueError("edge must be 'process' or 'thread'")

    def jobs_per_trial(self) -> list[tuple[str, int]]:
        """(mode, gamma) pairs of one trial; gamma 0 for modes that do not draft."""
        jobs: list[tuple[str, int]] = []
        for mode in self.modes:
            if mode in SPECULATIVE:
                jobs.extend((mode, g) for g in self.gammas)
            else:
                jobs.append((mode, 0))
        return jobs

    def n_generations(self) -> int:
        return len(self.profiles) * self.prompts * self.runs * len(self.samplings) * len(self.jobs_per_trial())

    def describe(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("profiles", "samplings")}
        d["target"], d["draft"], d["out"] = str(self.target), str(self.draft), str(self.out)
        d["profiles"] = [_profile_dict(p) for p in self.profiles]
        d["samplings"] = {n: asdict(s) for n, s in self.samplings}
        return d


def _profile_dict(p: LinkProfile) -> dict[str, Any]:
    return {"name": p.name, "rtt_ms": p.rtt_s * 1000, "up_mbps": _num(p.up_mbps), "down_mbps": _num(p.down_mbps),
            "jitter_ms": p.jitter_s * 1000, "burst_bytes": p.burst_bytes}


def _num(x: float) -> float | str:
    return "inf" if math.isinf(x) else x


# -- the edge -----------------------------------------------------------------------


@contextmanager
def edge_server(target: Path, *, how: str, log_path: Path | None, max_gamma: int = 16,
                timeout: float = 600.0) -> Iterator[str]:
    """Yields the ws:// URL of an edge serving `target` with one torch thread."""
    if how == "thread":
        from edge_service.backends.torch_backend import TorchTargetModel
        from edge_service.server import EdgeServerThread, ServerConfig
        from edge_service.session import EdgeLimits

        model = TorchTargetModel(target, threads=1)
        with EdgeServerThread(model, ServerConfig(port=0, limits=EdgeLimits(max_gamma=max_gamma))) as edge:
            yield edge.url
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "edge_service", "--model", str(target), "--threads", "1", "--port", "0",
           "--max-gamma", str(max_gamma)]
    err = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    try:
        url = wait_ready(proc, timeout)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log_path:
            err.close()


def wait_ready(proc: subprocess.Popen, timeout: float) -> str:
    """The URL from an edge subprocess's ready line (killed if none comes in time)."""
    found: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "ready" in line:
                found.append(line)
                break

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    if not found:
        proc.kill()
        raise RuntimeError(f"the edge did not print its ready line within {timeout:.0f} s (exit {proc.poll()})")
    m = re.search(r"wss?://[\w.\-]+:\d+", found[0])
    if not m:
        raise RuntimeError(f"cannot parse the edge's ready line: {found[0]!r}")
    return m.group(0)


# -- instrumentation ------------------------------------------------------------------


class Probe:
    """Timestamps of one generation's rounds, recorded around the drafter and the link."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.drafts: list[tuple[float, float, bool]] = []  # (start, seconds, on the event-loop thread)
        self.sent: list[tuple[str, int, float]] = []  # (message type, frame bytes, time)
        self.received: list[tuple[str, int, float, int]] = []  # (type, bytes, time, n_accepted or -1)


class TimedDrafter:
    """Wraps a LlamaDrafter; times each draft() call. Everything else is delegated.

    Pipelined drafting calls draft() from a worker thread while a verdict is in flight;
    those calls are recorded as background work (they overlap the wait).
    """

    def __init__(self, inner: Any, probe: Probe) -> None:
        self._inner = inner
        self._probe = probe
        self._loop_thread = threading.current_thread()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def draft(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        foreground = threading.current_thread() is self._loop_thread
        try:
            return self._inner.draft(*args, **kwargs)
        finally:
            self._probe.drafts.append((t0, time.perf_counter() - t0, foreground))


def instrument_link(link: Any, probe: Probe) -> None:
    """Records every frame's type, size and time on an `EdgeLink` (instance attributes only)."""
    if getattr(link, "_bench_probe", None) is probe:
        return
    send, recv = link.send, link.recv

    async def timed_send(msg: Any, *args: Any, **kwargs: Any) -> Any:
        before, t = link.bytes_up, time.perf_counter()
        out = await send(msg, *args, **kwargs)
        probe.sent.append((type(msg).__name__, link.bytes_up - before, t))
        return out

    async def timed_recv(expected: Any, *args: Any, **kwargs: Any) -> Any:
        before = link.bytes_down
        msg = await recv(expected, *args, **kwargs)
        n_acc = getattr(msg, "n_accepted", -1)
        probe.received.append((type(msg).__name__, link.bytes_down - before, time.perf_counter(), int(n_acc)))
        return msg

    link.send, link.recv = timed_send, timed_recv
    link._bench_probe = probe


def _mean(xs: Sequence[float]) -> float:
    return float(statistics.fmean(xs)) if xs else float("nan")


def round_metrics(probe: Probe, gamma: int) -> dict[str, float]:
    """Steady-state per-round means, rounds delimited by consecutive Draft sends.

    Round i runs from sending Draft i to sending Draft i+1: the wait for the verdict, any
    follow-up exchange (a candidate "More"), the resample and commit, and the foreground
    drafting of the next round (none when pipelining already drafted it). Round 0 is left
    out (it also waits for the edge's prefill), and the last has no end.
    """
    sends = [s for s in probe.sent if s[0] == "Draft"]
    head = cm.FRAME_HEADER_BYTES + cm.VERDICT_HEAD_BYTES
    rounds, drafts_s, waits, ups, downs, rejected, extra = [], [], [], [], [], [], []
    for i in range(len(sends) - 1):
        lo, hi = sends[i][2], sends[i + 1][2]
        sent = [s for s in probe.sent if lo <= s[2] < hi]
        recv = [r for r in probe.received if lo <= r[2] < hi]
        if not recv:
            continue
        if 0 <= min(r[3] for r in recv) < gamma:
            rejected.append(sum(r[1] for r in recv) - head)
        if i == 0:
            continue
        rounds.append(hi - lo)
        drafts_s.append(sum(d[1] for d in probe.drafts if d[2] and lo <= d[0] < hi))
        waits.append(recv[-1][2] - lo)
        ups.append(sum(s[1] for s in sent))
        downs.append(sum(r[1] for r in recv))
        extra.append(len(sent) - 1)  # follow-up exchanges (e.g. More after candidates): one RTT each
    return {
        "measured_round_s": _mean(rounds),
        "device_draft_s": _mean(drafts_s),
        "wait_s": _mean(waits),
        "up_bytes_per_round": _mean(ups),
        "down_bytes_per_round": _mean(downs),
        "reject_payload_bytes": _mean(rejected) if rejected else 0.0,
        "extra_trips_per_round": _mean(extra),
        "steady_rounds": float(len(rounds)),
    }


# -- running --------------------------------------------------------------------------


def build_prompts(drafter: Any, n: int) -> list[list[int]]:
    out = []
    for text in PROMPTS[:n]:
        try:
            prompt = drafter.chat_prompt([{"role": "user", "content": text}])
            out.append(drafter.tokenize(prompt, add_bos=False))
        except ValueError:  # no chat template: plain text
            out.append(drafter.tokenize(text))
    return out


def _row(profile: LinkProfile, sname: str, sp: SamplingParams, mode: str, gamma: int, prompt: int, seed: int,
         trial: int, max_new: int, result: Any, probe: Probe) -> dict[str, Any]:
    st = result.stats
    r = st.rounds
    edge = st.edge or {}
    edge_rounds = edge.get("spec_decode_num_drafts", 0) or 0
    row: dict[str, Any] = {
        "profile": profile.name,
        "rtt_ms": profile.rtt_s * 1000,
        "up_mbps": _num(profile.up_mbps),
        "down_mbps": _num(profile.down_mbps),
        "sampling": sname,
        "temperature": sp.temperature,
        "top_k": sp.top_k,
        "top_p": sp.top_p,
        "mode": mode,
        "gamma": gamma,
        "prompt": prompt,
        "seed": seed,
        "trial": trial,
        "max_new_tokens": max_new,
        "tokens": st.tokens,
        "finish": result.finish_reason,
        "wall_s": st.wall_s,
        "tokens_per_s": st.tokens_per_s,
        "ttft_s": st.ttft_s,
        "per_token_s": (st.wall_s - st.ttft_s) / (st.tokens - 1) if st.tokens > 1 else float("nan"),
        "rounds": r.rounds,
        "more_requests": getattr(r, "more_requests", 0),
        "pipelined_kept": getattr(st, "pipelined_kept", 0),
        "unverified_tokens": getattr(st, "unverified_tokens", 0),
        "draft_tokens": r.draft_tokens,
        "accepted_tokens": r.accepted_tokens,
        "acceptance_rate": r.acceptance_rate,
        "mean_accepted_length": r.mean_accepted_length,
        "accepted_per_position": json.dumps(list(r.accepted_per_position)),
        "drafted_per_position": json.dumps(list(r.drafted_per_position)),
        "bytes_up": st.bytes_up,
        "bytes_down": st.bytes_down,
        "bytes_per_token": st.bytes_per_token,
        "up_bytes_per_token": st.bytes_up / st.tokens if st.tokens else float("nan"),
        "down_bytes_per_token": st.bytes_down / st.tokens if st.tokens else float("nan"),
        "edge_verify_s": (edge.get("round_s", 0.0) / edge_rounds) if edge_rounds else float("nan"),
        "edge_prefill_s": edge.get("prefill_s", float("nan")),
    }
    if mode in SPECULATIVE:
        row.update(round_metrics(probe, gamma))
    return row


async def _run_profile(cfg: CompareConfig, profile: LinkProfile, url: str, drafter: Any, probe: Probe,
                       prompts: list[list[int]], bar: Any, rows: list[dict[str, Any]]) -> None:
    from device_runtime.session import DeviceClient, GenerationConfig

    client = DeviceClient(TimedDrafter(drafter, probe), url, client_name="benchmarks")
    try:
        if any(m != "device-only" for m in cfg.modes):
            instrument_link(await client.connect(), probe)
        jobs = cfg.jobs_per_trial()
        trial = 0
        for p_idx, prompt in enumerate(prompts):
            for seed in range(cfg.runs):
                for sname, sp in cfg.samplings:
                    k = trial % len(jobs)
                    for mode, gamma in jobs[k:] + jobs[:k]:  # rotate: no mode always runs first
                        max_new = cfg.mode_tokens.get(mode, cfg.tokens)
                        gen = _gen_config(GenerationConfig, mode=mode, max_new_tokens=max_new, sampling=sp,
                                          gamma=max(gamma, 1), seed=seed, pipeline=cfg.pipeline, fallback=False,
                                          round_timeout_s=300.0)
                        bar.set_postfix_str(f"{profile.name} {sname} {mode} g{gamma}", refresh=False)
                        probe.reset()
                        result = await client.generate(prompt, gen)
                        row = _row(profile, sname, sp, mode, gamma, p_idx, seed, trial, max_new, result, probe)
                        rows.append(row)
                        with open(cfg.out / "runs.partial.jsonl", "a") as f:  # survives an interrupted sweep
                            f.write(json.dumps(row) + "\n")
                        bar.update(1)
                    trial += 1
    finally:
        await client.close()


def _gen_config(cls: Any, **kwargs: Any) -> Any:
    """A GenerationConfig with the options this runtime version knows (older ones lack some)."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in kwargs.items() if k in known})


async def _warmup(cfg: CompareConfig, url: str, drafter: Any, prompt: list[int]) -> None:
    from device_runtime.session import DeviceClient, GenerationConfig

    client = DeviceClient(drafter, url, client_name="benchmarks-warmup")
    try:
        for mode in ("device-only", "edge-only", "dssd"):
            if mode == "device-only" or any(m != "device-only" for m in cfg.modes):
                sp = cfg.samplings[0][1]
                await client.generate(prompt, GenerationConfig(mode=mode, max_new_tokens=8, sampling=sp,
                                                               gamma=max(cfg.gammas)))
    finally:
        await client.close()


def run_compare(cfg: CompareConfig, extend: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None,
                ) -> dict[str, Any]:
    """Runs the whole sweep; writes runs.csv, summary.csv, ratios.csv, results.json, summary.md, plots.

    `extend(result, rows)` may add to the result (and its markdown) before it is written.
    """
    from tqdm import tqdm

    from device_runtime.drafter import LlamaDrafter

    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "runs.partial.jsonl").unlink(missing_ok=True)
    (cfg.out / "config.json").write_text(json.dumps(cfg.describe(), indent=1))
    rows: list[dict[str, Any]] = []
    t_start = time.time()
    drafter = LlamaDrafter(cfg.draft, n_ctx=cfg.n_ctx, n_threads=1, max_gamma=max(16, max(cfg.gammas)))
    probe = Probe()
    try:
        prompts = build_prompts(drafter, cfg.prompts)
        with ExitStack() as stack:
            needs_edge = any(m != "device-only" for m in cfg.modes)
            edge_url = (stack.enter_context(edge_server(cfg.target, how=cfg.edge, log_path=cfg.out / "edge.log",
                                                        max_gamma=max(16, max(cfg.gammas))))
                        if needs_edge else "")
            if cfg.warmup:
                asyncio.run(_warmup(cfg, edge_url, drafter, prompts[0]))
            bar = stack.enter_context(tqdm(total=cfg.n_generations(), file=sys.stderr, unit="gen",
                                           disable=not cfg.progress, dynamic_ncols=True))
            for profile in cfg.profiles:
                with ExitStack() as link_stack:
                    url = edge_url
                    if needs_edge and not profile.is_transparent:
                        url = link_stack.enter_context(LinkEmulator.for_url(edge_url, profile)).url
                    asyncio.run(_run_profile(cfg, profile, url, drafter, probe, prompts, bar, rows))
    finally:
        drafter.close()
    result = finish(cfg, rows, extend, n_vocab=_n_vocab(cfg.draft))
    result["elapsed_s"] = time.time() - t_start
    (cfg.out / "runs.partial.jsonl").unlink(missing_ok=True)
    return result


def finish(cfg: CompareConfig, rows: list[dict[str, Any]],
           extend: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None, *, n_vocab: int) -> dict[str, Any]:
    """Predictions, summary, ratios and every output file, from the per-generation rows."""
    add_predictions(rows, cfg.profiles, n_vocab)
    result = summarize(rows, cfg)
    result["n_vocab"] = n_vocab
    if extend is not None:
        extend(result, rows)
    write_outputs(result, rows, cfg)
    return result


def profile_from_dict(d: dict[str, Any]) -> LinkProfile:
    def rate(x: Any) -> float | None:
        return None if x in ("inf", None) or (isinstance(x, float) and math.isinf(x)) else float(x)

    return LinkProfile.from_mbps(rate(d["up_mbps"]), rate(d["down_mbps"]), rtt_ms=float(d["rtt_ms"]),
                                 jitter_ms=float(d.get("jitter_ms", 0.0)), burst_bytes=float(d.get("burst_bytes", 0.0)),
                                 name=d["name"])


def config_from_dict(d: dict[str, Any], out: Path) -> CompareConfig:
    return CompareConfig(
        target=Path(d["target"]), draft=Path(d["draft"]), out=out,
        profiles=[profile_from_dict(p) for p in d["profiles"]],
        modes=tuple(d["modes"]), gammas=tuple(d["gammas"]),
        samplings=[(n, SamplingParams(**sp)) for n, sp in d["samplings"].items()],
        prompts=d["prompts"], runs=d["runs"], tokens=d["tokens"], mode_tokens=dict(d.get("mode_tokens") or {}),
        edge=d.get("edge", "process"), pipeline=d.get("pipeline", True), n_ctx=d.get("n_ctx", 2048), plots=d.get("plots", True),
        progress=False, title=d.get("title", ""),
    )


def rebuild_report(src: Path, out: Path | None = None, *, plots: bool = True) -> dict[str, Any]:
    """Recompute predictions, summaries and plots from a finished or interrupted run's files."""
    out = out or src
    if (src / "results.json").exists():
        saved = json.loads((src / "results.json").read_text())
        config, rows, paper = saved["config"], saved["runs"], "paper_table" in saved
    else:
        config = json.loads((src / "config.json").read_text())
        rows = [json.loads(line) for line in (src / "runs.partial.jsonl").read_text().splitlines() if line.strip()]
        paper = False
    if not rows:
        raise ValueError(f"no runs recorded in {src}")
    cfg = config_from_dict(config, out)
    cfg.plots = plots
    out.mkdir(parents=True, exist_ok=True)
    extend = None
    if paper:
        from benchmarks.paper import extend_with_paper_table

        extend = extend_with_paper_table
    return finish(cfg, rows, extend, n_vocab=_n_vocab(cfg.draft))


def _n_vocab(path: Path) -> int:
    try:
        from dssd_common.gguf_header import read_token_strings

        return len(read_token_strings(path))
    except Exception:  # noqa: BLE001 - only used for the analytic model
        return 0


# -- the cost model beside the measurements ---------------------------------------------


def _median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(statistics.median(xs)) if xs else float("nan")


def components(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """Per (profile, sampling): t_draft from device-only, edge step from edge-only (medians)."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    keys = {(r["profile"], r["sampling"]) for r in rows}
    for key in keys:
        sel = [r for r in rows if (r["profile"], r["sampling"]) == key]
        out[key] = {
            "t_draft_s": _median([r["per_token_s"] for r in sel if r["mode"] == "device-only"]),
            "t_edge_step_s": _median([r["edge_verify_s"] for r in sel if r["mode"] == "edge-only"]),
        }
        for mode in SPECULATIVE:
            for g in sorted({r["gamma"] for r in sel if r["mode"] == mode}):
                out[key][f"t_verify_s[{mode},g{g}]"] = _median(
                    [r["edge_verify_s"] for r in sel if r["mode"] == mode and r["gamma"] == g])
    # t_draft does not depend on the link: fall back to any profile's measurement
    pooled: dict[str, list[float]] = {}
    for r in rows:
        if r["mode"] == "device-only":
            pooled.setdefault(r["sampling"], []).append(r["per_token_s"])
    for (prof, samp), comp in out.items():
        if math.isnan(comp["t_draft_s"]) and samp in pooled:
            comp["t_draft_s"] = _median(pooled[samp])
    return out


def add_predictions(rows: list[dict[str, Any]], profiles: Sequence[LinkProfile], n_vocab: int) -> None:
    """Adds predicted_round_s, round_ratio, predicted_wait_s and model_tokens_per_s to each row."""
    by_name = {p.name: p for p in profiles}
    comps = components(rows)
    for r in rows:
        link = by_name[r["profile"]].as_cost_link()
        comp = comps[(r["profile"], r["sampling"])]
        t_draft = comp["t_draft_s"]
        mode, g = r["mode"], r["gamma"]
        if mode in SPECULATIVE and not r.get("steady_rounds"):
            # a generation done in its first round (short --mode-tokens) has no steady round
            # to size the messages from: no prediction rather than a crash on NaN bytes
            for key in ("predicted_round_s", "predicted_wait_s", "round_ratio", "model_tokens_per_round",
                        "model_tokens_per_s"):
                r[key] = math.nan
        elif mode in SPECULATIVE:
            up, down = cm.ws_round_bytes(r["up_bytes_per_round"], r["down_bytes_per_round"])
            t_verify = r["edge_verify_s"]
            trips = link.rtt_s * (r.get("extra_trips_per_round") or 0.0)
            pred = (cm.round_time(g, t_draft, t_verify, link, up, down) + trips
                    if not math.isnan(t_draft) else float("nan"))
            r["predicted_round_s"] = pred
            r["predicted_wait_s"] = cm.round_time(0, 0.0, t_verify, link, up, down) + trips
            r["round_ratio"] = r["measured_round_s"] / pred if pred and pred > 0 else float("nan")
            # the analytic model: measured acceptance per position, message sizes from the
            # wire layout, the rejection payload this mode really sent
            acc = json.loads(r["accepted_per_position"])
            dr = json.loads(r["drafted_per_position"])
            cumulative = [a / d if d else 0.0 for a, d in zip(acc, dr)][:g]  # P(x_1..x_i accepted)
            alphas = cm.conditional_acceptance(cumulative)
            alphas += [alphas[-1] if alphas else 0.0] * (g - len(alphas))
            tokens = cm.expected_tokens_per_round_positions(alphas)
            p_rej = 1 - cm.prob_all_accepted_positions(alphas)
            greedy = r["temperature"] == 0
            up_a = cm.draft_message_bytes(mode, g, n_vocab, greedy=greedy, n_prefix=0 if greedy else p_rej)
            down_a = cm.verdict_message_bytes(p_rej, r["reject_payload_bytes"])
            up_w, down_w = cm.ws_round_bytes(up_a, down_a)
            t_model = (cm.round_time(g, t_draft, t_verify, link, up_w, down_w) + trips
                       if not math.isnan(t_draft) else math.nan)
            r["model_tokens_per_round"] = tokens
            r["model_tokens_per_s"] = tokens / t_model if t_model and t_model > 0 else float("nan")
        elif mode == "edge-only":
            step = r["edge_verify_s"]
            r["model_tokens_per_s"] = cm.edge_only_tokens_per_s(step, link) if step == step else float("nan")
        elif mode == "device-only":
            r["model_tokens_per_s"] = cm.device_only_tokens_per_s(t_draft) if t_draft == t_draft else math.nan


# -- summaries --------------------------------------------------------------------------

SUMMARY_METRICS = ("tokens_per_s", "ttft_s", "mean_accepted_length", "acceptance_rate", "bytes_per_token",
                   "up_bytes_per_token", "down_bytes_per_token", "measured_round_s", "predicted_round_s",
                   "round_ratio", "device_draft_s", "wait_s", "predicted_wait_s", "edge_verify_s",
                   "model_tokens_per_s")


def _stats(xs: Sequence[float]) -> dict[str, float]:
    xs = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": float(statistics.median(xs)), "min": min(xs), "max": max(xs), "n": len(xs)}


def _order(cfg_profiles: Sequence[str], rows: list[dict[str, Any]]) -> list[tuple[str, str, str, int]]:
    keys = []
    for r in rows:
        k = (r["profile"], r["sampling"], r["mode"], r["gamma"])
        if k not in keys:
            keys.append(k)
    prof_rank = {p: i for i, p in enumerate(cfg_profiles)}
    return sorted(keys, key=lambda k: (prof_rank.get(k[0], 99), k[1], ALL_MODES.index(k[2]), k[3]))


def summarize(rows: list[dict[str, Any]], cfg: CompareConfig) -> dict[str, Any]:
    summary = []
    for key in _order([p.name for p in cfg.profiles], rows):
        sel = [r for r in rows if (r["profile"], r["sampling"], r["mode"], r["gamma"]) == key]
        entry: dict[str, Any] = {"profile": key[0], "sampling": key[1], "mode": key[2], "gamma": key[3],
                                 "n": len(sel), "rtt_ms": sel[0]["rtt_ms"], "up_mbps": sel[0]["up_mbps"],
                                 "down_mbps": sel[0]["down_mbps"]}
        for m in SUMMARY_METRICS:
            if any(m in r for r in sel):
                entry[m] = _stats([r.get(m, float("nan")) for r in sel])
        acc = [0] * max((len(json.loads(r["accepted_per_position"])) for r in sel), default=0)
        dr = [0] * len(acc)
        for r in sel:
            for i, (a, d) in enumerate(zip(json.loads(r["accepted_per_position"]),
                                           json.loads(r["drafted_per_position"]))):
                acc[i] += a
                dr[i] += d
        entry["acceptance_per_position"] = [round(a / d, 4) if d else None for a, d in zip(acc, dr)]
        summary.append(entry)
    comps = {f"{k[0]}|{k[1]}": v for k, v in components(rows).items()}
    return {"config": cfg.describe(), "summary": summary, "ratios": paired_ratios(rows), "components": comps}


def paired_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """tokens/s ratios of generations that ran side by side (same profile, sampling, trial)."""
    pairs = [("dssd", "dsd"), ("dssd", "dssd-paper"), ("dssd", "edge-only"), ("dssd-paper", "edge-only"),
             ("dsd", "edge-only"), ("dssd", "device-only")]
    index: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        index[(r["profile"], r["sampling"], r["trial"], r["mode"], r["gamma"])] = r
    out = []
    prof_order = list(dict.fromkeys(r["profile"] for r in rows))
    groups = sorted({(r["profile"], r["sampling"], r["gamma"]) for r in rows if r["mode"] in SPECULATIVE},
                    key=lambda k: (prof_order.index(k[0]), k[1], k[2]))
    trials = sorted({r["trial"] for r in rows})
    for prof, samp, g in groups:
        for a, b in pairs:
            vals = []
            for t in trials:
                ra = index.get((prof, samp, t, a, g if a in SPECULATIVE else 0))
                rb = index.get((prof, samp, t, b, g if b in SPECULATIVE else 0))
                if ra and rb and rb["tokens_per_s"] > 0:
                    vals.append(ra["tokens_per_s"] / rb["tokens_per_s"])
            if vals:
                out.append({"profile": prof, "sampling": samp, "gamma": g, "ratio": f"{a} / {b}", **_stats(vals)})
    return out


# -- output ------------------------------------------------------------------------------


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields: list[str] = []
    for r in rows:
        for k in r:
            if k not in fields:
                fields.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k, "")) for k in fields})


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else (f"{v:.6g}" if not math.isinf(v) else "inf")
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return v


def flat_summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    flat = []
    for e in result["summary"]:
        row = {k: v for k, v in e.items() if not isinstance(v, dict)}
        for m in SUMMARY_METRICS:
            if m in e:
                row[f"{m}_median"] = e[m]["median"]
                row[f"{m}_min"] = e[m]["min"]
                row[f"{m}_max"] = e[m]["max"]
        flat.append(row)
    return flat


def write_outputs(result: dict[str, Any], rows: list[dict[str, Any]], cfg: CompareConfig) -> None:
    out = cfg.out
    _write_csv(out / "runs.csv", rows)
    _write_csv(out / "summary.csv", flat_summary(result))
    _write_csv(out / "ratios.csv", result["ratios"])
    with open(out / "results.json", "w") as f:
        json.dump({**result, "runs": rows}, f, indent=1, default=_json_default, allow_nan=True)
    md = markdown_report(result) + result.get("extra_markdown", "")
    (out / "summary.md").write_text(md)
    if cfg.plots:
        from benchmarks import plots

        result["plots"] = [str(p) for p in plots.plot_all(result, out)]


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return fmt.format(x)


def _spread(s: dict[str, float] | None, fmt: str = "{:.2f}") -> str:
    if not s or not s.get("n"):
        return "-"
    if s["n"] == 1:
        return _f(s["median"], fmt)
    return f"{_f(s['median'], fmt)} [{_f(s['min'], fmt)}-{_f(s['max'], fmt)}]"


def headline_table(result: dict[str, Any]) -> str:
    """One line per profile x sampling x gamma: tokens/s per mode, paired ratios, dssd overhead."""
    modes = [m for m in ALL_MODES if any(e["mode"] == m for e in result["summary"])]
    ratio_names = ("dssd / dsd", "dssd / dssd-paper", "dssd / edge-only")
    lines = ["| profile | sampling | γ | " + " | ".join(f"{m} tok/s" for m in modes) + " | "
             + " | ".join(ratio_names) + " | dssd round meas./model |",
             "|---|---|---:|" + "---:|" * (len(modes) + len(ratio_names) + 1)]
    groups = list(dict.fromkeys((e["profile"], e["sampling"], e["gamma"]) for e in result["summary"]
                                if e["mode"] in SPECULATIVE))
    for prof, samp, g in groups:
        cells = []
        for m in modes:
            e = next((x for x in result["summary"] if (x["profile"], x["sampling"], x["mode"]) == (prof, samp, m)
                      and x["gamma"] == (g if m in SPECULATIVE else 0)), None)
            cells.append(_spread(e.get("tokens_per_s")) if e else "-")
        for name in ratio_names:
            q = next((x for x in result["ratios"] if (x["profile"], x["sampling"], x["gamma"], x["ratio"])
                      == (prof, samp, g, name)), None)
            cells.append(_spread(q) if q else "-")
        d = next((x for x in result["summary"] if (x["profile"], x["sampling"], x["mode"], x["gamma"])
                  == (prof, samp, "dssd", g)), None)
        cells.append(_spread(d.get("round_ratio")) if d else "-")
        lines.append(f"| {prof} | {samp} | {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(result: dict[str, Any]) -> str:
    """Tables: headline, per-mode results, paired ratios, measured vs predicted round time, components."""
    lines = []
    cfg = result["config"]
    lines.append(f"# {cfg.get('title') or 'benchmarks compare'}")
    lines.append("")
    lines.append(f"draft `{Path(cfg['draft']).name}`, target `{Path(cfg['target']).name}`, "
                 f"{cfg['prompts']} prompts x {cfg['runs']} seeds, {cfg['tokens']} new tokens"
                 + (f" (per mode: {cfg['mode_tokens']})" if cfg.get("mode_tokens") else "")
                 + f"; median [min-max] over {cfg['prompts'] * cfg['runs']} trials.")
    lines.append("")
    if any(e["mode"] in SPECULATIVE for e in result["summary"]):
        lines.append("## Headline (tokens/s; ratios paired per trial)")
        lines.append("")
        lines.append(headline_table(result))
    lines.append("## Every mode")
    lines.append("")
    lines.append("| profile | sampling | mode | gamma | tok/s | TTFT ms | accepted len | accept/pos | "
                 "B/tok up | B/tok down | round ms meas. | round ms model | meas./model |")
    lines.append("|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for e in result["summary"]:
        ms = lambda s: None if s is None else {k: (v * 1000 if k != "n" else v) for k, v in s.items()}  # noqa: E731
        acc = " ".join(f"{a:.2f}" for a in e["acceptance_per_position"] if a is not None)
        lines.append(
            f"| {e['profile']} | {e['sampling']} | {e['mode']} | {e['gamma'] or '-'} "
            f"| {_spread(e.get('tokens_per_s'))} | {_spread(ms(e.get('ttft_s')), '{:.0f}')} "
            f"| {_spread(e.get('mean_accepted_length')) if e['mode'] in SPECULATIVE else '-'} | {acc or '-'} "
            f"| {_spread(e.get('up_bytes_per_token'), '{:.0f}')} | {_spread(e.get('down_bytes_per_token'), '{:.0f}')} "
            f"| {_spread(ms(e.get('measured_round_s')), '{:.0f}')} | {_spread(ms(e.get('predicted_round_s')), '{:.0f}')} "
            f"| {_spread(e.get('round_ratio'))} |")
    lines.append("")
    if result["ratios"]:
        lines.append("Paired tokens/s ratios (same trial, run side by side):")
        lines.append("")
        lines.append("| profile | sampling | gamma | ratio | median [min-max] |")
        lines.append("|---|---|---:|---|---:|")
        for q in result["ratios"]:
            lines.append(f"| {q['profile']} | {q['sampling']} | {q['gamma']} | {q['ratio']} | {_spread(q)} |")
        lines.append("")
    lines.append("Measured components (medians): t_draft = device-only per-token time; "
                 "edge step = edge-only per-token compute; t_verify = edge compute per round.")
    lines.append("")
    lines.append("| profile / sampling | component | ms |")
    lines.append("|---|---|---:|")
    for key, comp in sorted(result["components"].items()):
        for name, v in comp.items():
            lines.append(f"| {key} | {name} | {_f(v * 1000 if v == v else v, '{:.1f}')} |")
    lines.append("")
    return "\n".join(lines)
