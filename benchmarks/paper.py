"""The paper's grid (DSSD, arXiv 2507.12000, Table 2 setting) against a KV-cached edge-only baseline.

gamma in {2, 4, 6, 8} x RTT in {0, 20, 50} ms x bandwidth in {10, 50, 100} Mbps, T = 1.0,
top-k 10, 128 new tokens, for dssd, dssd-paper and dsd. Every cell is the median paired
tokens/s ratio over edge-only run side by side on the same link (the paper's baseline
was a no-KV-cache fp32 decoder; ours caches, so these speedups are honest), printed next
to the cost model's prediction from measured components.
"""
from __future__ import annotations

import math
import statistics
from typing import Any

from benchmarks.compare import CompareConfig, SAMPLINGS, run_compare
from benchmarks.link import LinkProfile
from protocol.modes import MODES, SPECULATIVE_MODES

PAPER_GAMMAS = (2, 4, 6, 8)
PAPER_RTTS_MS = (0.0, 20.0, 50.0)
PAPER_MBPS = (10.0, 50.0, 100.0)
PAPER_MODES = SPECULATIVE_MODES  # the paper's three methods


def paper_profiles(rtts_ms=PAPER_RTTS_MS, bandwidths_mbps=PAPER_MBPS) -> list[LinkProfile]:  # noqa: ANN001
    return [LinkProfile.from_mbps(bw, rtt_ms=rtt) for rtt in rtts_ms for bw in bandwidths_mbps]


def paper_config(base: CompareConfig) -> CompareConfig:
    """Forces the paper's modes (plus the baselines) and sampling onto a config."""
    base.modes = MODES  # the baselines too: edge-only, and device-only to measure t_draft for the model
    base.samplings = [("t1-k10", SAMPLINGS["t1-k10"])]
    return base


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if isinstance(x, (int, float)) and not math.isnan(x)]
    return float(statistics.median(xs)) if xs else float("nan")


def paper_table(result: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (mode, RTT, bandwidth, gamma): measured and predicted speedup over edge-only."""
    ratios = {(q["profile"], q["gamma"], q["ratio"]): q for q in result["ratios"]}
    table = []
    profiles = list(dict.fromkeys((r["profile"], r["rtt_ms"], r["down_mbps"]) for r in rows))
    for prof, rtt, bw in profiles:
        base_model = _median([r.get("model_tokens_per_s", math.nan) for r in rows
                              if r["profile"] == prof and r["mode"] == "edge-only"])
        for mode in PAPER_MODES:
            for g in sorted({r["gamma"] for r in rows if r["mode"] == mode}):
                q = ratios.get((prof, g, f"{mode} / edge-only"))
                model = _median([r.get("model_tokens_per_s", math.nan) for r in rows
                                 if r["profile"] == prof and r["mode"] == mode and r["gamma"] == g])
                table.append({
                    "mode": mode, "rtt_ms": float(rtt), "mbps": float(bw), "gamma": g,
                    "speedup": q["median"] if q else float("nan"),
                    "speedup_min": q["min"] if q else float("nan"),
                    "speedup_max": q["max"] if q else float("nan"),
                    "model_speedup": model / base_model if base_model and base_model > 0 else float("nan"),
                })
    return table


def format_paper_table(table: list[dict[str, Any]]) -> str:
    """Markdown shaped like the paper's Table 2: rows = link setting, columns = gamma."""
    out = []
    gammas = sorted({r["gamma"] for r in table})
    settings = list(dict.fromkeys((r["rtt_ms"], r["mbps"]) for r in table))
    for mode in dict.fromkeys(r["mode"] for r in table):
        out.append(f"\n### {mode}: speedup over KV-cached edge-only, measured (cost model)\n")
        out.append("| RTT (ms) | bandwidth (Mbps) | " + " | ".join(f"γ={g}" for g in gammas) + " |")
        out.append("|---:|---:|" + "---:|" * len(gammas))
        for rtt, bw in settings:
            cells = []
            for g in gammas:
                r = next((x for x in table if (x["mode"], x["rtt_ms"], x["mbps"], x["gamma"]) == (mode, rtt, bw, g)),
                         None)
                if r is None or math.isnan(r["speedup"]):
                    cells.append("-")
                else:
                    model = "-" if math.isnan(r["model_speedup"]) else f"{r['model_speedup']:.2f}"
                    cells.append(f"{r['speedup']:.2f}x ({model})")
            out.append(f"| {rtt:g} | {bw:g} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def extend_with_paper_table(result: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    table = paper_table(result, rows)
    result["paper_table"] = table
    result["extra_markdown"] = ("\n## Paper grid (T 1.0, top-k 10)\n" + format_paper_table(table))


def run_paper(cfg: CompareConfig) -> dict[str, Any]:
    return run_compare(paper_config(cfg), extend=extend_with_paper_table)
