"""`python -m benchmarks adaptive`: --gamma auto and pipelining against every fixed gamma.

The question a user asks before turning speculation on: is it ever slower than the best
setting I could have tuned by hand? For each draft model and link profile this runs,
back to back per prompt (one trial) and in a rotating order:
- dssd with each fixed gamma in --gammas (pipelined, the runtime default);
- dssd with --gamma auto, pipelined and not;
- on profiles with an RTT of at least --nopipe-rtt-ms, every fixed gamma again without
  pipelining (so "pipelined vs not" compares each side at its own best gamma);
- edge-only, for context (gamma 0 lets auto get close to it when drafting does not pay).
Greedy decoding by default: every variant then generates the same tokens, so tokens/s
differ only by how fast they get there.

The adaptive controller keeps what it learned across requests on one device client (as a
long-running device does); each (draft, profile) starts with one untimed warm-up request
per auto variant on a prompt that is not measured.

Checks (all ratios from this one run, paired per trial, medians):
- auto / best fixed gamma >= 0.95 on every (draft, profile);
- pipelined / non-pipelined >= 1.2 at the RTT of --nopipe-rtt-ms, both for auto and for
  the best fixed gamma on each side.
"""
from __future__ import annotations

import asyncio
import json
import logging
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from benchmarks.compare import (
    PROFILES,
    _num,
    _stats,
    _write_csv,
    build_prompts,
    edge_server,
)
from benchmarks.link import LinkEmulator, LinkProfile
from device_runtime.gamma import DEFAULT_MAX_GAMMA
from protocol.sampling import SamplingParams

log = logging.getLogger(__name__)

AUTO_TARGET = 0.95
PIPELINE_TARGET = 1.2


@dataclass(frozen=True)
class Variant:
    """One way of running a request: the mode, a fixed gamma or auto (None), pipelining."""

    mode: str
    gamma: int | None
    pipeline: bool

    @property
    def label(self) -> str:
        if self.mode != "dssd":
            return self.mode
        name = "auto" if self.gamma is None else f"g{self.gamma}"
        return name if self.pipeline else f"{name}-nopipe"


@dataclass
class AdaptiveConfig:
    target: Path
    drafts: list[tuple[str, Path]]
    out: Path
    profiles: list[LinkProfile] = field(default_factory=lambda: list(PROFILES.values()))
    sampling: tuple[str, SamplingParams] = ("greedy", SamplingParams(0.0))
    gammas: tuple[int, ...] = tuple(range(1, 9))
    #: auto's range, 0..this (the runtime's default, wider than the sweep: auto may go
    #: beyond the largest fixed gamma when that pays)
    auto_max_gamma: int = DEFAULT_MAX_GAMMA
    prompts: int = 3
    tokens: int = 64
    nopipe_rtt_ms: float = 50.0
    edge_only: bool = True
    edge: str = "process"
    n_ctx: int = 2048
    progress: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        if not self.gammas or min(self.gammas) < 1:
            raise ValueError("gammas must be >= 1")
        if not 1 <= self.prompts <= 7:
            raise ValueError("prompts must be in 1..7 (one more built-in prompt is kept for warm-up)")
        if self.tokens < 2:
            raise ValueError("tokens must be >= 2")

    @property
    def max_gamma(self) -> int:
        return max(*self.gammas, self.auto_max_gamma)

    def variants(self, profile: LinkProfile) -> list[Variant]:
        out = [Variant("dssd", g, True) for g in self.gammas]
        out += [Variant("dssd", None, True), Variant("dssd", None, False)]
        if profile.rtt_s * 1000 >= self.nopipe_rtt_ms - 1e-9:
            out += [Variant("dssd", g, False) for g in self.gammas]
        if self.edge_only:
            out.append(Variant("edge-only", None, False))
        return out

    def n_generations(self) -> int:
        return len(self.drafts) * self.prompts * sum(len(self.variants(p)) for p in self.profiles)

    def describe(self) -> dict[str, Any]:
        return {
            "target": str(self.target), "drafts": {n: str(p) for n, p in self.drafts},
            "profiles": [p.name for p in self.profiles], "sampling": self.sampling[0], "gammas": list(self.gammas),
            "auto_max_gamma": self.auto_max_gamma,
            "prompts": self.prompts, "tokens": self.tokens, "nopipe_rtt_ms": self.nopipe_rtt_ms, "edge": self.edge,
        }


# -- running ---------------------------------------------------------------------------


def _gen_config(v: Variant, cfg: AdaptiveConfig) -> Any:
    from device_runtime.session import GenerationConfig

    return GenerationConfig(mode=v.mode, max_new_tokens=cfg.tokens, sampling=cfg.sampling[1], gamma=v.gamma,
                            max_gamma=cfg.max_gamma, pipeline=v.pipeline, fallback=False, round_timeout_s=300.0)


def _row(draft: str, profile: LinkProfile, v: Variant, trial: int, result: Any) -> dict[str, Any]:
    st = result.stats
    gammas = list(getattr(st, "gammas", []))
    return {
        "draft": draft,
        "profile": profile.name,
        "rtt_ms": profile.rtt_s * 1000,
        "up_mbps": _num(profile.up_mbps),
        "down_mbps": _num(profile.down_mbps),
        "variant": v.label,
        "mode": v.mode,
        "gamma": "auto" if v.gamma is None and v.mode == "dssd" else (v.gamma or 0),
        "pipeline": v.pipeline,
        "trial": trial,
        "tokens": st.tokens,
        "wall_s": st.wall_s,
        "tokens_per_s": st.tokens_per_s,
        "ttft_s": st.ttft_s,
        "rounds": st.rounds.rounds,
        "mean_gamma": statistics.fmean(gammas) if gammas else float("nan"),
        "gamma_counts": json.dumps({g: gammas.count(g) for g in sorted(set(gammas))}),
        "mean_accepted_length": st.rounds.mean_accepted_length,
        "pipelined_kept": st.pipelined_kept,
        "draft_s": st.draft_s,
        "hideable_draft_s": st.hideable_draft_s,
        "pipelined_discarded": st.pipelined_discarded,
        "ids_hash": hash(tuple(result.ids)) & 0xFFFFFFFF,
    }


async def _run_pair(cfg: AdaptiveConfig, draft_name: str, profile: LinkProfile, url: str, drafter: Any,
                    prompts: list[list[int]], warmup_prompt: list[int], bar: Any,
                    rows: list[dict[str, Any]]) -> None:
    from device_runtime.session import DeviceClient

    variants = cfg.variants(profile)
    client = DeviceClient(drafter, url, client_name="benchmarks-adaptive")
    try:
        for v in variants:  # the auto controllers learn on an unmeasured prompt first
            if v.gamma is None and v.mode == "dssd":
                await client.generate(warmup_prompt, _gen_config(v, cfg))
        for trial, prompt in enumerate(prompts):
            k = trial % len(variants)
            for v in variants[k:] + variants[:k]:
                bar.set_postfix_str(f"{draft_name} {profile.name} {v.label}", refresh=False)
                result = await client.generate(prompt, _gen_config(v, cfg))
                row = _row(draft_name, profile, v, trial, result)
                rows.append(row)
                with open(cfg.out / "runs.partial.jsonl", "a") as f:  # survives an interrupted sweep
                    f.write(json.dumps(row) + "\n")
                bar.update(1)
    finally:
        await client.close()


def run_adaptive(cfg: AdaptiveConfig) -> dict[str, Any]:
    """The whole sweep; writes runs.csv, summary.csv, checks.csv, results.json, summary.md, a plot."""
    from tqdm import tqdm

    from device_runtime.drafter import LlamaDrafter

    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "runs.partial.jsonl").unlink(missing_ok=True)
    (cfg.out / "config.json").write_text(json.dumps(cfg.describe(), indent=1))
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    with ExitStack() as stack:
        url = stack.enter_context(edge_server(cfg.target, how=cfg.edge, log_path=cfg.out / "edge.log",
                                              max_gamma=max(16, cfg.max_gamma)))
        bar = stack.enter_context(tqdm(total=cfg.n_generations(), file=sys.stderr, unit="gen",
                                       disable=not cfg.progress, dynamic_ncols=True))
        for draft_name, draft_path in cfg.drafts:
            drafter = LlamaDrafter(draft_path, n_ctx=cfg.n_ctx, n_threads=1, max_gamma=max(16, cfg.max_gamma))
            try:
                all_prompts = build_prompts(drafter, cfg.prompts + 1)
                prompts, warmup = all_prompts[:-1], all_prompts[-1]
                for profile in cfg.profiles:
                    with ExitStack() as link_stack:
                        link_url = url
                        if not profile.is_transparent:
                            link_url = link_stack.enter_context(LinkEmulator.for_url(url, profile)).url
                        asyncio.run(_run_pair(cfg, draft_name, profile, link_url, drafter, prompts, warmup,
                                              bar, rows))
            finally:
                drafter.close()
    result = analyse(rows, cfg.describe())
    result["elapsed_s"] = time.time() - t0
    write_outputs(result, rows, cfg.out, plots=cfg.plots)
    (cfg.out / "runs.partial.jsonl").unlink(missing_ok=True)
    return result


# -- analysis (pure: rows in, numbers out) ---------------------------------------------------


def _paired(rows: list[dict[str, Any]], a: str, b: str) -> list[float]:
    """tokens/s of variant a over variant b, trial by trial."""
    by = {(r["variant"], r["trial"]): r["tokens_per_s"] for r in rows}
    return [by[(a, t)] / by[(b, t)] for t in sorted({r["trial"] for r in rows})
            if (a, t) in by and (b, t) in by and by[(b, t)] > 0]


def _ceiling(rows: list[dict[str, Any]], label: str, key: str) -> list[tuple[dict[str, Any], float]]:
    """Per trial, the speed-up a draft-ahead pipeline could at most give `label`'s run: its
    wall time over the wall time less the in-line drafting (`key`) it would have hidden.
    An upper bound: it assumes every such draft was ready when the verdict came and the
    bonus guess was always right."""
    out = []
    for r in rows:
        hidden = r.get(key)
        if r["variant"] == label and isinstance(hidden, (int, float)) and 0 <= hidden < r["wall_s"]:
            out.append((r, r["wall_s"] / (r["wall_s"] - hidden)))
    return out


def _best_ceiling(rows: list[dict[str, Any]], labels: Sequence[str]) -> list[float]:
    """Per trial: the fastest any sequential fixed gamma could go with its hideable drafts
    hidden, over the fastest sequential fixed gamma; a pipeline may pick another gamma
    than the sequential optimum, so this bounds pipelining at its best gamma too."""
    piped: dict[int, list[float]] = {}
    plain: dict[int, list[float]] = {}
    for label in labels:
        for r, c in _ceiling(rows, label, "hideable_draft_s"):
            piped.setdefault(r["trial"], []).append(r["tokens_per_s"] * c)
            plain.setdefault(r["trial"], []).append(r["tokens_per_s"])
    return [max(piped[t]) / max(plain[t]) for t in sorted(piped) if len(piped[t]) == len(labels)]


def _best(medians: dict[str, float], labels: Sequence[str]) -> str | None:
    present = [x for x in labels if x in medians]
    return max(present, key=lambda x: medians[x]) if present else None


def analyse(rows: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """Medians per variant, the best fixed gammas, and the issue's checks."""
    summary: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    groups = sorted({(r["draft"], r["profile"], r["rtt_ms"]) for r in rows},
                    key=lambda k: (k[0], -k[2], k[1]))
    for draft, profile, rtt in groups:
        sel = [r for r in rows if r["draft"] == draft and r["profile"] == profile]
        medians: dict[str, float] = {}
        for label in dict.fromkeys(r["variant"] for r in sel):
            vr = [r for r in sel if r["variant"] == label]
            tps = [r["tokens_per_s"] for r in vr]
            medians[label] = statistics.median(tps)
            summary.append({
                "draft": draft, "profile": profile, "rtt_ms": rtt, "variant": label,
                "tokens_per_s_median": medians[label], "tokens_per_s_min": min(tps), "tokens_per_s_max": max(tps),
                "n": len(tps), "mean_gamma": statistics.fmean(r["mean_gamma"] for r in vr)
                if vr[0]["mode"] == "dssd" else float("nan"),
                "mean_accepted_length": statistics.fmean(r["mean_accepted_length"] for r in vr),
                "pipelined_kept": sum(r["pipelined_kept"] for r in vr),
                "pipelined_discarded": sum(r["pipelined_discarded"] for r in vr),
            })
        fixed = [f"g{g}" for g in config["gammas"]]
        best = _best(medians, fixed)
        base = {"draft": draft, "profile": profile, "rtt_ms": rtt}
        if best and "auto" in medians:
            checks.append({**base, "check": "auto / best fixed gamma", "against": best,
                           "target": AUTO_TARGET, **_check(_paired(sel, "auto", best), AUTO_TARGET),
                           "ratio_of_medians": medians["auto"] / medians[best]})
        best_nopipe = _best(medians, [f"{x}-nopipe" for x in fixed])
        if "auto" in medians and "auto-nopipe" in medians and rtt >= config.get("nopipe_rtt_ms", 50.0):
            checks.append({**base, "check": "pipelined / not, auto", "against": "auto-nopipe",
                           "target": PIPELINE_TARGET, **_check(_paired(sel, "auto", "auto-nopipe"), PIPELINE_TARGET),
                           "ratio_of_medians": medians["auto"] / medians["auto-nopipe"]})
            if best and best_nopipe:
                checks.append({**base, "check": f"pipelined / not, best fixed ({best} vs {best_nopipe})",
                               "against": best_nopipe, "target": PIPELINE_TARGET,
                               **_check(_paired(sel, best, best_nopipe), PIPELINE_TARGET),
                               "ratio_of_medians": medians[best] / medians[best_nopipe]})
            for label, key in (("drafts after an all-pass round hidden", "hideable_draft_s"),
                               ("every draft hidden", "draft_s")):
                ceil = [c for _, c in _ceiling(sel, "auto-nopipe", key)]
                if ceil:
                    checks.append({**base, "check": f"pipelining ceiling: auto-nopipe with {label} (context)",
                                   "against": "auto-nopipe", "target": "", **_check(ceil, None),
                                   "ratio_of_medians": statistics.median(ceil)})
            best_ceil = _best_ceiling(sel, [f"{x}-nopipe" for x in fixed])
            if best_ceil:
                checks.append({**base, "check": "pipelining ceiling: best fixed gamma, drafts after an all-pass "
                               "round hidden, over the best sequential gamma (context)",
                               "against": best_nopipe, "target": "", **_check(best_ceil, None),
                               "ratio_of_medians": statistics.median(best_ceil)})
        if "edge-only" in medians and "auto" in medians:
            checks.append({**base, "check": "auto / edge-only (context)", "against": "edge-only", "target": "",
                           **_check(_paired(sel, "auto", "edge-only"), None),
                           "ratio_of_medians": medians["auto"] / medians["edge-only"]})
    same_text = all(len({r["ids_hash"] for r in rows if (r["draft"], r["profile"], r["trial"]) == k}) == 1
                    for k in {(r["draft"], r["profile"], r["trial"]) for r in rows})
    return {"config": config, "summary": summary, "checks": checks,
            "greedy_outputs_identical": same_text if config.get("sampling") == "greedy" else None}


def _check(ratios: list[float], target: float | None) -> dict[str, Any]:
    s = _stats(ratios)
    return {**s, "pass": "" if target is None or not s["n"] else s["median"] >= target}


# -- output ------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [f"# Adaptive gamma and pipelining ({cfg['sampling']}, {cfg['tokens']} tokens, "
             f"{cfg['prompts']} prompts per cell)", "",
             "Ratios are tokens/s, paired per trial (prompt); median [min-max] over trials.", "",
             "| draft | profile | check | median [min-max] | ratio of medians | target | pass |",
             "|---|---|---|---|---|---|---|"]
    for c in result["checks"]:
        lines.append(f"| {c['draft']} | {c['profile']} | {c['check']} | {c['median']:.3f} "
                     f"[{c['min']:.2f}-{c['max']:.2f}] | {c['ratio_of_medians']:.3f} | {c['target']} | "
                     f"{'' if c['pass'] == '' else ('yes' if c['pass'] else 'NO')} |")
    lines += ["", "Median tokens/s per variant (mean gamma chosen; mean accepted length):", ""]
    for draft in dict.fromkeys(s["draft"] for s in result["summary"]):
        profiles = list(dict.fromkeys(s["profile"] for s in result["summary"] if s["draft"] == draft))
        labels = list(dict.fromkeys(s["variant"] for s in result["summary"] if s["draft"] == draft))
        cell = {(s["profile"], s["variant"]): s for s in result["summary"] if s["draft"] == draft}
        lines += [f"**{draft}**", "", "| variant | " + " | ".join(profiles) + " |",
                  "|---|" + "---|" * len(profiles)]
        for label in labels:
            parts = []
            for p in profiles:
                s = cell.get((p, label))
                if s is None:
                    parts.append("")
                elif label.startswith("auto"):
                    parts.append(f"{s['tokens_per_s_median']:.2f} (g {s['mean_gamma']:.1f})")
                else:
                    parts.append(f"{s['tokens_per_s_median']:.2f}")
            lines.append(f"| {label} | " + " | ".join(parts) + " |")
        lines.append("")
    if result.get("greedy_outputs_identical") is not None:
        lines.append(f"Greedy outputs identical across variants in every trial: "
                     f"{result['greedy_outputs_identical']}.")
    if "elapsed_s" in result:
        lines.append(f"Elapsed: {result['elapsed_s'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], out: Path) -> Path | None:
    try:
        from benchmarks.plots import plt, save_figure
    except ImportError:  # plots are optional
        return None
    summary = result["summary"]
    drafts = list(dict.fromkeys(s["draft"] for s in summary))
    profiles = list(dict.fromkeys(s["profile"] for s in summary))
    gammas = result["config"]["gammas"]
    fig, axes = plt.subplots(len(drafts), len(profiles), figsize=(3.6 * len(profiles), 3.0 * len(drafts)),
                             squeeze=False, sharey="row")
    for i, d in enumerate(drafts):
        for j, p in enumerate(profiles):
            ax = axes[i][j]
            cell = {s["variant"]: s["tokens_per_s_median"] for s in summary if s["draft"] == d and s["profile"] == p}
            ax.plot(gammas, [cell.get(f"g{g}", float("nan")) for g in gammas], "o-", label="fixed gamma")
            if any(f"g{g}-nopipe" in cell for g in gammas):
                ax.plot(gammas, [cell.get(f"g{g}-nopipe", float("nan")) for g in gammas], "s--",
                        label="fixed, no pipelining")
            for label, style in (("auto", "-"), ("auto-nopipe", "--"), ("edge-only", ":")):
                if label in cell:
                    ax.axhline(cell[label], linestyle=style, color={"auto": "C2", "auto-nopipe": "C3",
                                                                    "edge-only": "k"}[label], label=label)
            ax.set_title(f"{d}, {p}", fontsize=9)
            ax.set_xlabel("gamma")
            if j == 0:
                ax.set_ylabel("tokens/s (median)")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, out / "adaptive.png")


def write_outputs(result: dict[str, Any], rows: list[dict[str, Any]], out: Path, *, plots: bool = True) -> None:
    _write_csv(out / "runs.csv", rows)
    _write_csv(out / "summary.csv", result["summary"])
    _write_csv(out / "checks.csv", result["checks"])
    (out / "results.json").write_text(json.dumps({**result, "runs": rows}, indent=1, allow_nan=True))
    (out / "summary.md").write_text(markdown(result))
    if plots:
        plot(result, out)


def rebuild(src: Path, *, plots: bool = True) -> dict[str, Any]:
    """Analyse an earlier or interrupted run's directory again (runs.partial.jsonl or results.json)."""
    partial = src / "runs.partial.jsonl"
    if partial.exists():
        rows = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
    else:
        rows = json.loads((src / "results.json").read_text())["runs"]
    result = analyse(rows, json.loads((src / "config.json").read_text()))
    write_outputs(result, rows, src, plots=plots)
    return result
