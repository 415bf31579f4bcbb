"""PNG plots of a compare/paper result (matplotlib, Agg backend: no display needed).

- tokens_per_s.png: tokens/s per mode across link profiles (ordered by bandwidth), one
  panel per sampling setting, error bars = min-max over trials;
- bytes_per_token.png: bytes per generated token, up and down, per mode (log scale);
- round_time.png: measured vs predicted round time (cost model), with the y = x and
  y = 1.15x lines;
- paper_speedup.png (paper runs): speedup over edge-only vs gamma per link setting.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODE_COLORS = {"dssd": "tab:green", "dssd-paper": "tab:orange", "dsd": "tab:red", "edge-only": "tab:blue",
               "device-only": "tab:gray"}
MODE_ORDER = ("dssd", "dssd-paper", "dsd", "edge-only", "device-only")
MARKERS = "osD^v<>pPX*h"


def save_figure(fig: Any, path: Path, *, title: str | None = None, title_size: float | None = None,
                dpi: int = 110) -> Path:
    """Title, layout, write and free a figure: every plot here ends the same way."""
    if title:
        fig.suptitle(title, fontsize=title_size)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _bw(v: Any) -> float:
    return math.inf if v in ("inf", None) else float(v)


def _ok(x: Any) -> bool:
    return isinstance(x, (int, float)) and not math.isnan(x)


def _profiles_by_bandwidth(summary: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, tuple[float, float]] = {}
    for e in summary:
        seen.setdefault(e["profile"], (_bw(e["down_mbps"]), -float(e["rtt_ms"])))
    return sorted(seen, key=lambda p: seen[p])


def _main_gamma(summary: list[dict[str, Any]]) -> int | None:
    gammas = sorted({e["gamma"] for e in summary if e["gamma"]})
    if not gammas:
        return None
    return 4 if 4 in gammas else gammas[len(gammas) // 2]


def plot_tokens_per_s(result: dict[str, Any], path: Path) -> Path:
    summary = result["summary"]
    profiles = _profiles_by_bandwidth(summary)
    samplings = list(dict.fromkeys(e["sampling"] for e in summary))
    g = _main_gamma(summary)
    fig, axes = plt.subplots(1, len(samplings), figsize=(5.5 * len(samplings), 4.2), squeeze=False)
    for ax, samp in zip(axes[0], samplings):
        for mode in MODE_ORDER:
            pts = []
            for i, prof in enumerate(profiles):
                for e in summary:
                    if (e["profile"], e["sampling"], e["mode"]) == (prof, samp, mode) and e["gamma"] in (0, g):
                        s = e["tokens_per_s"]
                        pts.append((i, s["median"], s["median"] - s["min"], s["max"] - s["median"]))
            if pts:
                xs, ys, lo, hi = zip(*pts)
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=MODE_COLORS[mode],
                            label=mode + (f" (γ={g})" if mode in ("dssd", "dssd-paper", "dsd") else ""))
        ax.set_xticks(range(len(profiles)))
        ax.set_xticklabels(profiles, rotation=20, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("tokens / s (median, min-max)")
        ax.set_xlabel("link profile (bandwidth ↑)")
        ax.set_title(f"sampling {samp}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, path, title="Throughput per mode across links")


def plot_bytes_per_token(result: dict[str, Any], path: Path) -> Path:
    summary = result["summary"]
    samplings = list(dict.fromkeys(e["sampling"] for e in summary))
    g = _main_gamma(summary)
    fig, axes = plt.subplots(1, len(samplings), figsize=(5.5 * len(samplings), 4.2), squeeze=False)
    for ax, samp in zip(axes[0], samplings):
        modes = [m for m in MODE_ORDER if m != "device-only"
                 and any(e["mode"] == m and e["sampling"] == samp for e in summary)]
        ups, downs = [], []
        for mode in modes:
            sel = [e for e in summary if e["mode"] == mode and e["sampling"] == samp and e["gamma"] in (0, g)]
            ups.append(_median_of(sel, "up_bytes_per_token"))
            downs.append(_median_of(sel, "down_bytes_per_token"))
        xs = range(len(modes))
        ax.bar([x - 0.2 for x in xs], ups, width=0.4, label="up (device → edge)", color="tab:purple")
        ax.bar([x + 0.2 for x in xs], downs, width=0.4, label="down (edge → device)", color="tab:cyan")
        for x, u, d in zip(xs, ups, downs):
            for dx, v in ((-0.2, u), (0.2, d)):
                if _ok(v) and v > 0:
                    ax.text(x + dx, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(modes)
        ax.set_yscale("log")
        ax.set_ylabel("bytes per token (median over runs and links)")
        ax.set_title(f"sampling {samp}" + (f", γ={g}" if g else ""))
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, path, title="Traffic per generated token")


def _median_of(entries: list[dict[str, Any]], metric: str) -> float:
    vals = sorted(e[metric]["median"] for e in entries if metric in e and _ok(e[metric]["median"]))
    if not vals:
        return float("nan")
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def plot_round_time(result: dict[str, Any], path: Path) -> Path:
    summary = [e for e in result["summary"] if "measured_round_s" in e and "predicted_round_s" in e]
    profiles = _profiles_by_bandwidth(result["summary"])
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    lo, hi = math.inf, 0.0
    for e in summary:
        m, p = e["measured_round_s"]["median"] * 1000, e["predicted_round_s"]["median"] * 1000
        if not (_ok(m) and _ok(p)) or m <= 0 or p <= 0:
            continue
        lo, hi = min(lo, m, p), max(hi, m, p)
        marker = MARKERS[profiles.index(e["profile"]) % len(MARKERS)] if e["profile"] in profiles else "o"
        ax.scatter(p, m, color=MODE_COLORS.get(e["mode"], "k"), marker=marker, s=40, alpha=0.8)
    if hi > 0:
        xs = [lo / 1.5, hi * 1.5]
        ax.plot(xs, xs, "k-", lw=1, label="measured = model")
        ax.plot(xs, [x * 1.15 for x in xs], "k--", lw=1, label="1.15 × model")
        ax.set_xscale("log")
        ax.set_yscale("log")
    for mode in MODE_ORDER[:3]:
        ax.scatter([], [], color=MODE_COLORS[mode], label=mode)
    for i, prof in enumerate(profiles):
        ax.scatter([], [], color="k", marker=MARKERS[i % len(MARKERS)], label=prof)
    ax.set_xlabel("predicted round time, ms (cost model from measured components)")
    ax.set_ylabel("measured round time, ms (median)")
    ax.set_title("Round time: measured vs cost model")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)


def plot_paper_speedup(table: list[dict[str, Any]], path: Path) -> Path:
    methods = list(dict.fromkeys(r["mode"] for r in table))
    settings = list(dict.fromkeys((r["rtt_ms"], r["mbps"]) for r in table))
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4), squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], methods):
        for i, (rtt, bw) in enumerate(settings):
            pts = sorted((r["gamma"], r["speedup"], r.get("model_speedup")) for r in table
                         if r["mode"] == mode and (r["rtt_ms"], r["mbps"]) == (rtt, bw) and _ok(r["speedup"]))
            if not pts:
                continue
            gs, sp, model = zip(*pts)
            line, = ax.plot(gs, sp, marker=MARKERS[i % len(MARKERS)], label=f"{rtt:g} ms / {bw:g} Mbps")
            if all(_ok(m) for m in model):
                ax.plot(gs, model, ls=":", color=line.get_color())
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(sorted({r["gamma"] for r in table}))
        ax.set_title(f"{mode} (dotted: cost model)")
        ax.set_xlabel("gamma")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("speedup vs edge-only (tokens/s ratio)")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path)


def plot_all(result: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_tokens_per_s(result, out / "tokens_per_s.png"),
             plot_bytes_per_token(result, out / "bytes_per_token.png"),
             plot_round_time(result, out / "round_time.png")]
    if result.get("paper_table"):
        paths.append(plot_paper_speedup(result["paper_table"], out / "paper_speedup.png"))
    return paths
