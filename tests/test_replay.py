"""The offline replay of the gamma controller (benchmarks/replay.py): pure, fast."""
from __future__ import annotations

import json

import numpy as np

from benchmarks.__main__ import build_parser, main
from benchmarks.replay import Timing, compare, replay
from device_runtime.gamma import GammaController

EXACT = Timing(draft_s=0.015, noise=0.0)


def test_a_fixed_gamma_commits_accepted_plus_one_per_round() -> None:
    rate, gammas = replay([14] * 80, 64, EXACT, np.random.default_rng(0), gamma=4, pipeline=False)
    assert gammas == [4] * 12 + [3]  # 5 tokens a round; the last round is cut to what is left
    _, gammas = replay([1] * 80, 64, EXACT, np.random.default_rng(0), gamma=4, pipeline=False)
    assert len(gammas) == 32  # one accepted + the correction each round
    assert rate > 0


def test_drafts_made_ahead_hide_drafting_only_when_whole_drafts_pass() -> None:
    def rate(runs: list[int], pipeline: bool) -> float:
        return replay(runs, 64, EXACT, np.random.default_rng(0), gamma=6, pipeline=pipeline)[0]

    assert rate([14] * 80, True) > 1.1 * rate([14] * 80, False)
    assert rate([2] * 80, True) <= rate([2] * 80, False)  # guesses never pass: only contention


def test_the_controller_drafts_long_on_a_draft_that_always_passes() -> None:
    control = GammaController(12, pipeline=True)
    for _ in range(4):
        replay([14] * 80, 64, EXACT, np.random.default_rng(0), controller=control)
    assert np.median(control.history[-20:]) >= 10


def test_compare_pairs_auto_with_the_best_fixed_gamma() -> None:
    """Every draft agrees for exactly 3 tokens: g3 (all pass + bonus) is the best fixed
    gamma, and auto finds it; a draft that always agrees lets auto go past the sweep's 8."""
    def make() -> GammaController:
        return GammaController(12, pipeline=True)

    short = compare([[3] * 80] * 3, EXACT, make)
    assert short["best_gamma"] == 3 and abs(short["mean_gamma"] - 3) < 0.5 and short["ratio"] > 0.9
    long = compare([[14] * 80] * 3, EXACT, make)
    assert long["best_gamma"] == 8 and long["mean_gamma"] > 8 and long["ratio"] > 1.0


def test_cli_replays_given_traces(tmp_path, capsys) -> None:  # noqa: ANN001
    path = tmp_path / "traces.json"
    path.write_text(json.dumps({"q4_0": [[2] * 80, [4] * 80], "q4_1": [[14] * 80, [14] * 80]}))
    args = ["replay", "--traces", str(path), "--seeds", "2", "--tokens", "32"]
    assert build_parser().parse_args(args).seeds == 2
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| q4_1 | loopback |" in table and "| q4_0 | 1mbps-50ms |" in table
