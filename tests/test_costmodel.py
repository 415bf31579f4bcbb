"""protocol.costmodel: the paper's formulas, the small terms, and their limits."""
from __future__ import annotations

import math

import numpy as np
import pytest

from protocol import costmodel as cm


def test_expected_tokens_per_round_matches_formula_and_limits() -> None:
    assert cm.expected_tokens_per_round(0.0, 4) == 1.0
    assert cm.expected_tokens_per_round(1.0, 4) == 5.0
    assert cm.expected_tokens_per_round(0.5, 4) == pytest.approx((1 - 0.5**5) / 0.5)
    assert cm.expected_tokens_per_round(0.7, 0) == 1.0
    assert cm.expected_tokens_per_round(1 - 1e-12, 3) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        cm.expected_tokens_per_round(1.2, 4)
    with pytest.raises(ValueError):
        cm.expected_tokens_per_round(0.5, -1)


def test_expected_tokens_by_simulation() -> None:
    rng = np.random.default_rng(0)
    a, g, n = 0.7, 4, 200_000
    accepted = rng.random((n, g)) < a
    first_reject = np.where(accepted.all(axis=1), g, accepted.argmin(axis=1))
    assert (first_reject + 1).mean() == pytest.approx(cm.expected_tokens_per_round(a, g), rel=0.01)


def test_per_position_version_reduces_to_iid() -> None:
    for a in (0.0, 0.3, 0.9, 1.0):
        assert cm.expected_tokens_per_round_positions([a] * 5) == pytest.approx(cm.expected_tokens_per_round(a, 5))
    assert cm.expected_tokens_per_round_positions([0.8, 0.5]) == pytest.approx(1 + 0.8 + 0.4)
    assert cm.prob_all_accepted_positions([0.8, 0.5]) == pytest.approx(0.4)
    assert cm.prob_all_accepted_positions([]) == 1.0
    assert cm.prob_all_accepted(0.5, 3) == 0.125


def test_conditional_acceptance_from_cumulative_rates() -> None:
    cumulative = [0.7, 0.42, 0.21, 0.0]  # what RoundStats.acceptance_per_position() reports
    alphas = cm.conditional_acceptance(cumulative)
    assert alphas == pytest.approx([0.7, 0.6, 0.5, 0.0])
    assert cm.expected_tokens_per_round_positions(alphas) == pytest.approx(1 + sum(cumulative))
    assert cm.prob_all_accepted_positions(alphas) == pytest.approx(cumulative[-1])
    assert cm.conditional_acceptance([0.0, 0.0]) == [0.0, 0.0]


def test_acceptance_from_mean_length_inverts() -> None:
    for a in (0.1, 0.5, 0.93):
        length = cm.expected_tokens_per_round(a, 4)
        assert cm.acceptance_from_mean_length(length, 4) == pytest.approx(a, abs=1e-6)
    with pytest.raises(ValueError):
        cm.acceptance_from_mean_length(6.0, 4)


def test_units_and_transfer() -> None:
    assert cm.mbps(1) == 125_000
    link = cm.Link.from_mbps(1, 10, rtt_ms=50)
    assert link.up_bytes_per_s == 125_000 and link.down_bytes_per_s == 1_250_000 and link.rtt_s == 0.05
    assert cm.transfer_s(250_000, 125_000) == 2.0
    assert cm.transfer_s(10**9, math.inf) == 0.0
    assert cm.transfer_s(0, 1.0) == 0.0


def test_round_time_is_the_sum_of_its_terms() -> None:
    link = cm.Link(rtt_s=0.05, up_bytes_per_s=1000.0, down_bytes_per_s=2000.0)
    t = cm.round_time(4, t_draft=0.01, t_verify=0.1, link=link, up_bytes=500, down_bytes=1000)
    assert t == pytest.approx(4 * 0.01 + 0.1 + 0.05 + 0.5 + 0.5)
    assert cm.round_time(0, 0.01, 0.1, cm.Link(), 10**9, 10**9) == pytest.approx(0.1)


def test_paper_equations() -> None:
    link = cm.Link.from_mbps(1, rtt_ms=50)
    V = 49_152
    dsd = cm.paper_round_time("dsd", 4, 0.7, 0.01, 0.1, link, V)
    dssd = cm.paper_round_time("dssd", 4, 0.7, 0.01, 0.1, link, V)
    base = 0.04 + 0.1 + 0.05
    assert dsd == pytest.approx(base + 4 * V * 4 / 125_000)
    assert dssd == pytest.approx(base + (1 - 0.7**4) * V * 4 / 125_000)


def test_message_sizes_per_mode() -> None:
    V, g = 49_152, 4
    up_dsd, down_dsd = cm.round_bytes("dsd", g, V, p_reject=0.7, greedy=False)
    up_dssd, down_dssd = cm.round_bytes("dssd", g, V, p_reject=0.7, greedy=False, downlink="support", support=10)
    up_paper, down_paper = cm.round_bytes("dssd-paper", g, V, p_reject=0.7, greedy=False)
    assert up_dsd > g * V * 4 > 100 * up_dssd
    assert up_dssd == up_paper
    assert down_dsd < 50
    assert 0.7 * V * 4 < down_paper < 0.7 * V * 4 + 100
    assert down_dssd < 0.7 * 80 + 50
    # greedy: ids only up (dsd still ships its rows), nothing but the token down
    up_g, down_g = cm.round_bytes("dssd", g, V, p_reject=0.7, greedy=True)
    assert up_g < 60 and down_g < 50
    assert cm.round_bytes("dssd-paper", g, V, p_reject=0.7, greedy=True) == (up_g, down_g)
    assert cm.ws_frame_bytes(10, masked=True) == 16
    assert cm.ws_frame_bytes(200, masked=False) == 204
    assert cm.ws_frame_bytes(70_000, masked=False) == 70_010
    assert cm.rejection_payload_bytes("candidates", V, candidates=8) == 64
    with pytest.raises(ValueError):
        cm.rejection_payload_bytes("zip", V)


def test_dssd_beats_dsd_on_a_slow_link_and_ties_on_an_ideal_one() -> None:
    V = 49_152
    slow = cm.Link.from_mbps(1, rtt_ms=50)
    args = dict(gamma=4, a=0.7, t_draft=0.01, t_verify=0.08, n_vocab=V)
    dssd = cm.speculative_tokens_per_s("dssd", link=slow, downlink="support", support=10, **args)
    paper = cm.speculative_tokens_per_s("dssd-paper", link=slow, **args)
    dsd = cm.speculative_tokens_per_s("dsd", link=slow, **args)
    assert dssd > 3 * paper and dssd > 10 * dsd
    ideal = cm.Link()
    rates = [cm.speculative_tokens_per_s(m, link=ideal, **args) for m in cm.SPECULATIVE_MODES]
    assert max(rates) == pytest.approx(min(rates))
    per_pos = cm.speculative_tokens_per_s("dssd", link=ideal, **{**args, "a": [0.7] * 4})
    assert per_pos == pytest.approx(rates[0])


def test_edge_and_device_only() -> None:
    assert cm.edge_only_tokens_per_s(0.04, cm.Link.from_mbps(100, rtt_ms=5)) == pytest.approx(25.0)
    assert cm.edge_only_tokens_per_s(0.0, cm.Link(0, math.inf, 100.0)) == pytest.approx(100 / 27)  # 16 + 5 + 4 bytes + 2 of WebSocket framing
    assert cm.device_only_tokens_per_s(0.02) == pytest.approx(50.0)


def test_optimal_gamma_behaves() -> None:
    V = 49_152
    fast = cm.Link.from_mbps(100, rtt_ms=5)
    g, rate = cm.optimal_gamma(0.9, 0.005, lambda g: 0.04 + 0.005 * g, fast, V, max_gamma=8)
    assert g >= 3 and rate > 0
    # a useless draft: gamma 0 (let the edge decide every token) wins
    g0, _ = cm.optimal_gamma(0.0, 0.02, 0.04, fast, V)
    assert g0 == 0
    # DSD on a slow link: every drafted token costs |V| floats up, so draft nothing
    gd, _ = cm.optimal_gamma(0.7, 0.01, 0.05, cm.Link.from_mbps(1, rtt_ms=50), V, mode="dsd")
    assert gd == 0
    # per-position rates: positions beyond the list reuse the last rate
    gp, _ = cm.optimal_gamma([0.9, 0.8], 0.005, 0.04, fast, V, max_gamma=6)
    assert 0 <= gp <= 6


def test_pipelined_round_time() -> None:
    # never used: the plain round; always used with a long wait: just the wait
    assert cm.pipelined_round_s(4, 0.01, 0.2, 0.0) == pytest.approx(4 * 0.01 + 0.2)
    assert cm.pipelined_round_s(4, 0.01, 0.2, 1.0) == pytest.approx(0.2)
    # always used but drafting is slower than the wait: the drafting bounds the round
    assert cm.pipelined_round_s(4, 0.1, 0.2, 1.0) == pytest.approx(0.5)
    assert cm.pipelined_round_s(0, 0.1, 0.2, 1.0) == pytest.approx(0.2)
