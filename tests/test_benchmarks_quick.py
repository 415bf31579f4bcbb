"""The benchmark harness end to end on the tiny pair: every mode, an emulated link, outputs written.

Checks structure and byte counts only (deterministic); never timing.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from benchmarks.__main__ import build_parser, main
from benchmarks.compare import ALL_MODES, CompareConfig, parse_profile, parse_sampling, run_compare
from benchmarks.paper import extend_with_paper_table, format_paper_table, paper_config


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_quick_profile_end_to_end(tiny_pair, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "quick"
    cfg = CompareConfig(
        target=tiny_pair.target_gguf, draft=tiny_pair.draft_gguf, out=out,
        profiles=[parse_profile("loopback"), parse_profile("50/10")],
        samplings=[parse_sampling("greedy"), parse_sampling("t1")],
        gammas=(2,), prompts=1, runs=1, tokens=12, edge="thread", n_ctx=512, progress=False,
    )
    result = run_compare(cfg)
    for name in ("runs.csv", "summary.csv", "ratios.csv", "results.json", "summary.md",
                 "tokens_per_s.png", "bytes_per_token.png", "round_time.png"):
        assert (out / name).stat().st_size > 0, name
    runs = _rows(out / "runs.csv")
    assert len(runs) == cfg.n_generations() == 2 * 2 * len(ALL_MODES)
    assert {r["mode"] for r in runs} == set(ALL_MODES)
    assert {r["profile"] for r in runs} == {"loopback", "50mbps-10ms"}
    for r in runs:
        assert int(r["tokens"]) >= 1
        assert float(r["tokens_per_s"]) > 0
    by = {(r["profile"], r["sampling"], r["mode"]): r for r in runs}
    for prof in ("loopback", "50mbps-10ms"):
        # DSD ships full Q rows up; DSSD only ids (+ q scalars): the byte counts say so
        assert float(by[(prof, "t1", "dsd")]["up_bytes_per_token"]) > 3 * float(by[(prof, "t1", "dssd")]["up_bytes_per_token"])
        assert int(by[(prof, "greedy", "device-only")]["bytes_up"]) == 0
        for mode in ("dssd", "dssd-paper", "dsd"):
            r = by[(prof, "t1", mode)]
            assert float(r["predicted_round_s"]) > 0 and float(r["measured_round_s"]) > 0
            assert float(r["up_bytes_per_round"]) > 0 and float(r["down_bytes_per_round"]) > 0
    # the link's RTT is part of every predicted round through the proxy
    assert float(by[("50mbps-10ms", "greedy", "dssd")]["predicted_round_s"]) >= 0.010
    summary = json.loads((out / "results.json").read_text())
    assert summary["summary"] and summary["ratios"] and summary["components"]
    assert any(q["ratio"] == "dssd / edge-only" for q in result["ratios"])
    assert "| profile |" in (out / "summary.md").read_text()


def test_paper_table_on_tiny_grid(tiny_pair, tmp_path: Path) -> None:  # noqa: ANN001
    from benchmarks.paper import paper_profiles

    cfg = paper_config(CompareConfig(
        target=tiny_pair.target_gguf, draft=tiny_pair.draft_gguf, out=tmp_path / "paper",
        profiles=paper_profiles((0.0,), (100.0,)), gammas=(2,), prompts=1, runs=1, tokens=10,
        edge="thread", n_ctx=512, progress=False, plots=True, warmup=False,
    ))
    result = run_compare(cfg, extend=extend_with_paper_table)
    table = result["paper_table"]
    assert {r["mode"] for r in table} == {"dssd", "dssd-paper", "dsd"}
    assert all(r["speedup"] > 0 and not math.isnan(r["model_speedup"]) for r in table)
    text = format_paper_table(table)
    assert "γ=2" in text and "| 0 | 100 |" in text
    assert (tmp_path / "paper" / "paper_speedup.png").stat().st_size > 0


def test_cli_help_and_argument_parsing(capsys) -> None:  # noqa: ANN001
    for cmd in ("compare", "paper", "quick"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert "--out" in capsys.readouterr().out
    args = build_parser().parse_args(["compare", "--profiles", "1mbps-50ms,1:10/50", "--gammas", "2,4",
                                      "--mode-tokens", "dsd=16", "--samplings", "t0.7-k40-p0.95"])
    assert args.gammas == (2, 4) and args.mode_tokens == {"dsd": 16}
    p = parse_profile(args.profiles[1])
    assert (p.up_mbps, p.down_mbps, round(p.rtt_s, 3)) == (1.0, 10.0, 0.05)
    name, sp = parse_sampling(args.samplings[0])
    assert (sp.temperature, sp.top_k, sp.top_p) == (0.7, 40, 0.95)
    with pytest.raises(ValueError):
        parse_profile("fast")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--mode-tokens", "warp=3"])


def test_cli_builds_each_commands_config(tiny_pair, tmp_path: Path) -> None:  # noqa: ANN001
    """Every flag reaches the config of its own command (and no other)."""
    from benchmarks.__main__ import adaptive_config_from_args, config_from_args

    models = ["--target", str(tiny_pair.target_gguf), "--draft", str(tiny_pair.draft_gguf)]
    for cmd in ("compare", "quick"):
        cfg = config_from_args(build_parser().parse_args([cmd, "--tiny", *models, "--gammas", "3",
                                                          "--out", str(tmp_path / cmd)]))
        assert cfg.gammas == (3,) and cfg.draft == tiny_pair.draft_gguf
    args = build_parser().parse_args(["adaptive", "--target", str(tiny_pair.target_gguf), "--drafts",
                                      str(tiny_pair.draft_gguf), "--gammas", "1,2", "--auto-max-gamma", "5",
                                      "--out", str(tmp_path / "adaptive")])
    cfg = adaptive_config_from_args(args)
    assert (cfg.gammas, cfg.auto_max_gamma, cfg.max_gamma) == ((1, 2), 5, 5)
    assert cfg.drafts == [(str(tiny_pair.draft_gguf), tiny_pair.draft_gguf)]


def test_adaptive_sweep_end_to_end(tiny_pair, tmp_path: Path) -> None:  # noqa: ANN001
    from benchmarks.adaptive import AdaptiveConfig, rebuild, run_adaptive

    out = tmp_path / "adaptive"
    cfg = AdaptiveConfig(target=tiny_pair.target_gguf, drafts=[("tiny", tiny_pair.draft_gguf)], out=out,
                         profiles=[parse_profile("loopback"), parse_profile("50/50")], gammas=(1, 2),
                         prompts=2, tokens=12, edge="thread", n_ctx=512, progress=False)
    result = run_adaptive(cfg)
    for name in ("runs.csv", "summary.csv", "checks.csv", "results.json", "summary.md", "adaptive.png"):
        assert (out / name).stat().st_size > 0, name
    runs = _rows(out / "runs.csv")
    assert len(runs) == cfg.n_generations() == 2 * (5 + 7)
    assert {r["variant"] for r in runs if r["profile"] == "50mbps-50ms"} == {
        "g1", "g2", "auto", "auto-nopipe", "g1-nopipe", "g2-nopipe", "edge-only"}
    assert result["greedy_outputs_identical"] is True  # greedy: every variant, the same text
    checks = {(c["profile"], c["check"].split(" (")[0]) for c in result["checks"]}
    assert ("50mbps-50ms", "pipelined / not, best fixed") in checks
    assert ("loopback", "auto / best fixed gamma") in checks
    assert not any(c["profile"] == "loopback" and c["check"].startswith("pipelined") for c in result["checks"])
    assert rebuild(out, plots=False)["checks"] == json.loads(json.dumps(result["checks"]))


def test_adaptive_analysis_pairs_trials_and_picks_the_best_fixed_gamma() -> None:
    from benchmarks.adaptive import analyse

    def row(variant: str, trial: int, tps: float) -> dict:
        mode = "edge-only" if variant == "edge-only" else "dssd"
        return {"draft": "d", "profile": "p", "rtt_ms": 50.0, "variant": variant, "mode": mode, "trial": trial,
                "tokens_per_s": tps, "mean_gamma": 2.0, "mean_accepted_length": 2.0, "pipelined_kept": 0,
                "pipelined_discarded": 0, "ids_hash": 7}

    rows = []
    for t, scale in enumerate((1.0, 2.0, 4.0)):  # trials differ a lot; ratios are paired
        rows += [row("g1", t, 10 * scale), row("g2", t, 12 * scale), row("auto", t, 11.5 * scale),
                 row("auto-nopipe", t, 9 * scale), row("g1-nopipe", t, 8 * scale), row("g2-nopipe", t, 10 * scale),
                 row("edge-only", t, 11 * scale)]
        rows[-4].update(wall_s=10.0, draft_s=2.0, hideable_draft_s=0.5)  # auto-nopipe's drafting
        rows[-3].update(wall_s=10.0, draft_s=3.0, hideable_draft_s=2.0)  # g1-nopipe: 8 -> 10 tok/s at most
        rows[-2].update(wall_s=10.0, draft_s=3.0, hideable_draft_s=1.0)  # g2-nopipe: 10 -> 11.1
    result = analyse(rows, {"gammas": [1, 2], "sampling": "greedy"})
    checks = {c["check"]: c for c in result["checks"]}
    auto = checks["auto / best fixed gamma"]
    assert auto["against"] == "g2" and auto["median"] == pytest.approx(11.5 / 12) and auto["pass"] is True
    assert auto["min"] == auto["max"]  # paired per trial: the trial scale cancels
    assert checks["pipelined / not, auto"]["median"] == pytest.approx(11.5 / 9) and checks["pipelined / not, auto"]["pass"]
    best = checks["pipelined / not, best fixed (g2 vs g2-nopipe)"]
    assert best["median"] == pytest.approx(1.2) and best["pass"] is True
    # what a draft-ahead pipeline could at most save on auto-nopipe's runs
    every = checks["pipelining ceiling: auto-nopipe with every draft hidden (context)"]
    assert every["median"] == pytest.approx(10 / 8)
    hideable = checks["pipelining ceiling: auto-nopipe with drafts after an all-pass round hidden (context)"]
    assert hideable["median"] == pytest.approx(10 / 9.5)
    (best_ceiling,) = [c for name, c in checks.items() if name.startswith("pipelining ceiling: best fixed")]
    assert best_ceiling["median"] == pytest.approx((10 / 9) / 1.0) and best_ceiling["min"] == best_ceiling["max"]
    assert result["greedy_outputs_identical"] is True


def test_hotpath_pieces_run_and_report(tmp_path) -> None:  # noqa: ANN001
    """The hot-path benchmark's paths run on a small vocabulary and its report renders
    (its figures come from a real run: docs/hotpath.md)."""
    import numpy as np
    import torch

    from benchmarks import hotpath
    from benchmarks import sampling_before as before

    logits, drafts, q = hotpath._rounds(1000, 3, seed=0)
    buf = np.empty((hotpath.GAMMA + 1, 1000), np.float32)
    hotpath._numpy_round(before.probabilities, logits, drafts, q, buf)
    hotpath._torch_round(torch.from_numpy(logits.reshape(-1, 1000)), drafts, q)
    rows = [{"section": "edge_round", "vocab": v, "batch": b, "path": p, "value": 1.0 + i, "unit": "ms"}
            for v in hotpath.VOCABS for b in hotpath.BATCHES for i, p in enumerate(("numpy-before", "numpy", "torch"))]
    rows += [{"section": "device_token", "vocab": v, "batch": 1, "path": p, "value": 1.0, "unit": "ms"}
             for v in hotpath.VOCABS for p in ("before", "after")]
    text = hotpath.markdown(rows)
    assert "| 151,936 | 16 | 1.00 | 2.00 | 3.00 | 0.3x |" in text
    assert hotpath.plot(rows, tmp_path / "hotpath.png").exists()
