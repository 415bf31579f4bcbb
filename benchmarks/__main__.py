"""`python -m benchmarks {compare,paper,report,adaptive,replay,hotpath,kv,capacity,gpu,prefill,quick}`: every mode side by side over emulated links.

compare  the link profiles x modes x gammas x sampling sweep (modest defaults; flags scale up)
paper    the paper's grid (gamma x RTT x bandwidth, T 1, top-k 10) as a Table-2-shaped table
report   recompute summaries and plots from an earlier (or interrupted) run's directory
adaptive --gamma auto and pipelining against every fixed gamma, per draft and link
replay   the gamma controller replayed offline on real acceptance traces (seconds)
hotpath  host work around the models: edge verification per batched round (torch vs numpy),
         device transform per token, device-only vs a bare eval loop, prefill peak RSS
kv       batched verify of 16 sessions x 1,000 tokens: KV slots vs the old cache re-pack
capacity N replay devices against one edge: dssd vs batched edge-only, N* at an SLO
gpu      the edge on a CUDA device: greedy equality, forward time by batch size, capacity
prefill  p99 round latency of 8 sessions while a 2,000-token prompt arrives, chunked vs not
structured  JSON-schema output vs free text: acceptance, accepted length, tokens/s
quick    the harness end to end on tiny random models in seconds (CI smoke test)

Results go to --out: runs.csv (one row per generation), summary.csv / summary.md (medians
and min-max), ratios.csv (paired tokens/s ratios), results.json, and PNG plots.
One thread per runtime: the edge runs as `python -m edge_service --threads 1`.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from benchmarks.compare import (  # noqa: E402
    ALL_MODES,
    PROFILES,
    SAMPLINGS,
    CompareConfig,
    parse_profile,
    parse_sampling,
    run_compare,
)
from device_runtime.gamma import DEFAULT_MAX_GAMMA  # noqa: E402
from dssd_common.models import FAMILIES  # noqa: E402

if TYPE_CHECKING:
    from benchmarks.adaptive import AdaptiveConfig


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in _csv(s))


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in _csv(s))


def _mode_tokens(s: str) -> dict[str, int]:
    out = {}
    for item in _csv(s):
        mode, _, n = item.partition("=")
        if mode not in ALL_MODES or not n.isdigit():
            raise argparse.ArgumentTypeError(f"expected MODE=N with MODE in {ALL_MODES}, got {item!r}")
        out[mode] = int(n)
    return out


def _common(p: argparse.ArgumentParser, *, out: str, prompts: int, runs: int, tokens: int, gammas: str,
            edge: str = "process", mode_tokens: str = "") -> None:
    g = p.add_argument_group("models and processes")
    g.add_argument("--family", choices=FAMILIES, default=FAMILIES[0],
                   help="real pair for the defaults of --target/--draft: smollm2 (SmolLM2-135M, Q4_1 target, "
                        "Q4_0 draft) or gemma3 (Gemma-3-270M, Q4_K_M target, Q4_0 draft; prepared with "
                        "`python -m quantize prepare --family gemma3 --accept-gemma-terms`)")
    g.add_argument("--target", type=Path, default=None, help="target model for the edge (default: the family's)")
    g.add_argument("--draft", type=Path, default=None, help="draft GGUF for the device (default: the family's Q4_0)")
    g.add_argument("--tiny", action="store_true", help="use tiny random models built on the fly (fast, smoke test)")
    g.add_argument("--edge", choices=("process", "thread"), default=edge,
                   help="edge as a subprocess (python -m edge_service) or a thread in this process")
    g.add_argument("--n-ctx", type=int, default=2048, help="draft context size")
    g.add_argument("--no-pipeline", action="store_true",
                   help="the device waits idle for each verdict (the cost model's assumption); "
                        "default: the runtime's pipelined drafting")
    r = p.add_argument_group("workload")
    r.add_argument("--prompts", type=int, default=prompts, help="number of built-in chat prompts")
    r.add_argument("--runs", type=int, default=runs, help="seeds per prompt (each prompt x seed is one trial)")
    r.add_argument("--tokens", type=int, default=tokens, help="max new tokens per generation")
    r.add_argument("--mode-tokens", type=_mode_tokens, default=_mode_tokens(mode_tokens),
                   help="per-mode max new tokens, e.g. dsd=32 (dsd on a slow link takes seconds per round)")
    r.add_argument("--gammas", type=_ints, default=_ints(gammas), help="comma list of draft lengths")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path(out), help="results directory")
    o.add_argument("--title", default="", help="title of summary.md")
    o.add_argument("--no-plots", action="store_true")
    o.add_argument("--no-warmup", action="store_true")
    o.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    o.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compare", help="modes x links x gammas x sampling, with the cost model",
                       description="Every mode side by side over emulated links; CSV/JSON/PNG to --out.")
    _common(c, out="bench-results/compare", prompts=2, runs=1, tokens=64, gammas="4", mode_tokens="dsd=32")
    c.add_argument("--profiles", type=_csv, default=["1mbps-50ms", "10mbps-20ms", "100mbps-5ms", "loopback"],
                   help=f"comma list: {', '.join(PROFILES)} or MBPS/RTT_MS or UP:DOWN/RTT_MS (e.g. 10/20, 1:10/50)")
    c.add_argument("--jitter-ms", type=float, default=0.0, help="jitter added to every emulated profile")
    c.add_argument("--modes", type=_csv, default=list(ALL_MODES), help=f"comma list of {', '.join(ALL_MODES)}")
    c.add_argument("--samplings", type=_csv, default=["t1"],
                   help=f"comma list: {', '.join(SAMPLINGS)} or t<T>[-k<K>][-p<P>]")

    pp = sub.add_parser("paper", help="the paper's grid as a Table-2-shaped table (speedup vs edge-only)",
                        description="gamma x RTT x bandwidth for dssd, dssd-paper, dsd vs KV-cached edge-only, "
                                    "T 1.0, top-k 10.")
    _common(pp, out="bench-results/paper", prompts=1, runs=1, tokens=128, gammas="2,4,6,8")
    pp.add_argument("--rtts", type=_floats, default=(0.0, 20.0, 50.0), help="RTTs in ms")
    pp.add_argument("--bandwidths", type=_floats, default=(10.0, 50.0, 100.0), help="rates in Mbps (both ways)")

    rp = sub.add_parser("report", help="recompute summaries and plots from a results directory",
                        description="Rebuild summary/ratios/plots from DIR/results.json, or from an "
                                    "interrupted run's DIR/config.json + runs.partial.jsonl.")
    rp.add_argument("src", type=Path, help="results directory of an earlier compare/paper run")
    rp.add_argument("--out", type=Path, default=None, help="write here instead of SRC")
    rp.add_argument("--no-plots", action="store_true")

    a = sub.add_parser("adaptive", help="--gamma auto and pipelining vs every fixed gamma (issue 9)",
                       description="dssd with fixed gammas, auto, and without pipelining, per draft and "
                                   "link profile; checks auto >= 0.95x the best fixed gamma and "
                                   "pipelined >= 1.2x not pipelined at 50 ms RTT.")
    a.add_argument("--target", type=Path, default=None, help="target model (default: the default pair)")
    a.add_argument("--drafts", type=_csv, default=["q4_1", "q4_0"],
                   help="comma list of q4_1, q4_0 (the default pair's drafts) or GGUF paths")
    a.add_argument("--tiny", action="store_true", help="tiny random models built on the fly (smoke test)")
    a.add_argument("--edge", choices=("process", "thread"), default="process")
    a.add_argument("--profiles", type=_csv, default=list(PROFILES), help="comma list of profiles or MBPS/RTT_MS")
    a.add_argument("--sampling", default="greedy", help="greedy, t1, t1-k10 or t<T>[-k<K>][-p<P>]")
    a.add_argument("--gammas", type=_ints, default=tuple(range(1, 9)), help="fixed gammas to sweep")
    a.add_argument("--auto-max-gamma", type=int, default=DEFAULT_MAX_GAMMA,
                   help="largest gamma auto may choose (the runtime's default)")
    a.add_argument("--prompts", type=int, default=3, help="built-in prompts (one trial each)")
    a.add_argument("--tokens", type=int, default=64, help="max new tokens per generation")
    a.add_argument("--nopipe-rtt-ms", type=float, default=50.0,
                   help="sweep fixed gammas without pipelining on profiles with at least this RTT")
    a.add_argument("--no-edge-only", action="store_true", help="skip the edge-only reference")
    a.add_argument("--report", type=Path, default=None, metavar="DIR",
                   help="only re-analyse an earlier or interrupted run in DIR")
    a.add_argument("--out", type=Path, default=Path("bench-results/adaptive"))
    a.add_argument("--no-plots", action="store_true")
    a.add_argument("--no-progress", action="store_true")
    a.add_argument("-v", "--verbose", action="store_true")

    r = sub.add_parser("replay", help="the gamma controller on recorded acceptance, offline (seconds)",
                       description="Replays GammaController against every fixed gamma on the default "
                                   "pair's greedy acceptance traces under a fitted timing model "
                                   "(benchmarks/replay.py); builds the traces first if missing.")
    r.add_argument("--traces", type=Path, default=Path("bench-results/replay/traces.json"),
                   help="acceptance traces (JSON; built from the default pair when missing, ~9 min)")
    r.add_argument("--tokens", type=int, default=64, help="tokens per replayed request")
    r.add_argument("--seeds", type=int, default=10, help="simulated records per (draft, profile)")
    r.add_argument("--noise", type=float, default=0.08, help="sigma of log-normal timing noise")
    r.add_argument("--max-gamma", type=int, default=DEFAULT_MAX_GAMMA, help="auto's range 0..this")
    r.add_argument("--no-progress", action="store_true")

    h = sub.add_parser("hotpath", help="host work around the models, before and after issue 18 (~3 min)",
                       description="Edge host time per batched round (torch vs numpy), device transform "
                                   "per token, device-only vs a bare llama-cpp-python loop, prefill peak RSS; "
                                   "CSV + PNG to --out (benchmarks/hotpath.py).")
    from benchmarks.hotpath import add_arguments as hotpath_arguments

    hotpath_arguments(h)

    k = sub.add_parser("kv", help="batched verify, KV slots vs the old re-pack (issue 19)",
                       description="16 sessions x 1,000 tokens of context: seconds per batched verify round "
                                   "with KV slots and with the old DynamicCache re-pack, same model, one run "
                                   "(benchmarks/kv.py).")
    from benchmarks.kv import add_arguments as kv_arguments

    kv_arguments(k)

    sub.add_parser("capacity", help="N devices against one edge: dssd vs batched edge-only, capacity at an SLO",
                   description="See python -m benchmarks capacity --help (benchmarks/capacity.py).")

    gp = sub.add_parser("gpu", help="the edge on CUDA: bf16/fp32 greedy equality, forward time by batch, capacity",
                        description="GPU check in one run (< 8 min): benchmarks/gpu.py. Fails clearly without "
                                    "CUDA; --device cpu --quick is the dry run.")
    from benchmarks.gpu import add_arguments as gpu_arguments

    gpu_arguments(gp)

    pf = sub.add_parser("prefill", help="p99 round latency of 8 sessions while a 2,000-token prompt arrives",
                        description="Head-of-line delay of a long prompt, chunked prefill vs not "
                                    "(benchmarks/prefill_hol.py).")
    from benchmarks.prefill_hol import add_arguments as prefill_arguments

    prefill_arguments(pf)
    st = sub.add_parser("structured", help="JSON-schema output vs free text: acceptance and tokens/s",
                        description="Same prompts as free text and under a JSON schema (exact constrained "
                                    "decoding on both sides), back to back (benchmarks/structured.py).")
    from benchmarks.structured import add_arguments as structured_arguments

    structured_arguments(st)

    q = sub.add_parser("quick", help="the harness end to end on tiny models (seconds)",
                       description="Smoke test: tiny random models, an in-process edge, two links.")
    _common(q, out="bench-results/quick", prompts=1, runs=2, tokens=16, gammas="2", edge="thread")
    q.add_argument("--profiles", type=_csv, default=["loopback", "10/20"])
    q.add_argument("--samplings", type=_csv, default=["greedy", "t1"])
    return p


def _models(args: argparse.Namespace, out: Path) -> tuple[Path, Path]:
    if args.tiny or args.command == "quick":
        if args.target or args.draft:
            return Path(args.target), Path(args.draft)
        from quantize.tiny import build_tiny_pair

        pair = build_tiny_pair(out / "tiny_models")
        return pair.target_gguf, pair.draft_gguf
    from dssd_common.models import default_models, gemma3_models

    if args.family == "gemma3":
        g = gemma3_models()
        target, draft = args.target or g.target_gguf, args.draft or g.draft_gguf
        prepare = "python -m quantize prepare --family gemma3 --accept-gemma-terms"
    else:
        d = default_models()
        target, draft = args.target or d.target_gguf, args.draft or d.draft_q4_0_gguf
        prepare = "python -m quantize prepare-default` (or `make models)"
    for path in (target, draft):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} not found: run `{prepare}`")
    return Path(target), Path(draft)


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    target, draft = _models(args, args.out)
    cfg = CompareConfig(
        target=target, draft=draft, out=args.out, gammas=args.gammas, prompts=args.prompts, runs=args.runs,
        tokens=args.tokens, mode_tokens=args.mode_tokens, edge=args.edge, pipeline=not args.no_pipeline, warmup=not args.no_warmup,
        n_ctx=args.n_ctx, plots=not args.no_plots, progress=not args.no_progress, title=args.title,
    )
    if args.command == "paper":
        from benchmarks.paper import paper_profiles

        cfg.profiles = paper_profiles(args.rtts, args.bandwidths)
    else:
        cfg.profiles = [parse_profile(s, jitter_ms=getattr(args, "jitter_ms", 0.0)) for s in args.profiles]
        cfg.samplings = [parse_sampling(s) for s in args.samplings]
        if args.command == "compare":
            cfg.modes = tuple(args.modes)
    cfg.__post_init__()
    return cfg


def adaptive_config_from_args(args: argparse.Namespace) -> AdaptiveConfig:
    from benchmarks.adaptive import AdaptiveConfig

    if args.tiny:
        from quantize.tiny import build_tiny_pair

        pair = build_tiny_pair(args.out / "tiny_models")
        target, drafts = pair.target_gguf, [("tiny", pair.draft_gguf)]
    else:
        from dssd_common.models import default_models

        d = default_models()
        known = {"q4_1": d.draft_q4_1_gguf, "q4_0": d.draft_q4_0_gguf}
        target = args.target or d.target_gguf
        drafts = [(x, Path(known.get(x, x))) for x in args.drafts]
        for path in [target] + [p for _, p in drafts]:
            if not Path(path).exists():
                raise FileNotFoundError(f"{path} not found: run `python -m quantize prepare-default`")
    return AdaptiveConfig(
        target=Path(target), drafts=drafts, out=args.out, profiles=[parse_profile(s) for s in args.profiles],
        sampling=parse_sampling(args.sampling), gammas=args.gammas, auto_max_gamma=args.auto_max_gamma,
        prompts=args.prompts, tokens=args.tokens,
        nopipe_rtt_ms=args.nopipe_rtt_ms, edge_only=not args.no_edge_only, edge=args.edge,
        progress=not args.no_progress, plots=not args.no_plots)


def _adaptive(args: argparse.Namespace) -> int:
    from benchmarks import adaptive

    if args.report:
        print(adaptive.markdown(adaptive.rebuild(args.report, plots=not args.no_plots)))
        return 0
    try:
        cfg = adaptive_config_from_args(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"adaptive: {cfg.n_generations()} generations -> {cfg.out}", file=sys.stderr)
    result = adaptive.run_adaptive(cfg)
    print(adaptive.markdown(result))
    print(f"done in {result['elapsed_s']:.0f} s; results in {cfg.out}/ (runs.csv, summary.csv, checks.csv, "
          "results.json, summary.md" + (", adaptive.png" if cfg.plots else "") + ")", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["capacity"]:  # its own parser (benchmarks/capacity.py)
        from benchmarks import capacity

        return capacity.main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "report":
        from benchmarks.compare import rebuild_report

        out = args.out or args.src
        rebuild_report(args.src, args.out, plots=not args.no_plots)
        print((out / "summary.md").read_text())
        return 0
    if args.command == "adaptive":
        return _adaptive(args)
    if args.command == "replay":
        from benchmarks import replay

        return replay.main(args)
    if args.command == "hotpath":
        from benchmarks import hotpath

        return hotpath.main(args)
    if args.command == "kv":
        from benchmarks import kv

        return kv.main(args)
    if args.command == "gpu":
        from benchmarks import gpu

        return gpu.main(args)
    if args.command == "prefill":
        from benchmarks import prefill_hol

        return prefill_hol.main(args)
    if args.command == "structured":
        from benchmarks import structured

        return structured.main(args)
    try:
        cfg = config_from_args(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.command}: {cfg.n_generations()} generations -> {cfg.out}", file=sys.stderr)
    if args.command == "paper":
        from benchmarks.paper import run_paper

        result = run_paper(cfg)
    else:
        result = run_compare(cfg)
    print((cfg.out / "summary.md").read_text())
    print(f"done in {result['elapsed_s']:.0f} s; results in {cfg.out}/ "
          f"(runs.csv, summary.csv, ratios.csv, results.json, summary.md"
          + (", *.png" if cfg.plots else "") + ")", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
