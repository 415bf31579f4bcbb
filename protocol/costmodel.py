"""Cost model of one speculative round, per mode: pure functions, no I/O, no clocks.

Used by the benchmarks (predicted beside measured round times) and meant for an
adaptive-gamma controller, so every function takes plain numbers and returns plain
numbers. Units everywhere: seconds, bytes, bytes per second (use `mbps()` to convert
link rates given in megabits per second). An infinite rate means "no bandwidth limit".

The model (the paper's eqs. 7 and 13 plus the small terms it drops):

    E[tokens per round]  = (1 - a^(g+1)) / (1 - a)                 a = acceptance rate, g = gamma
    round time           = g * t_draft + t_verify + RTT + up_bytes / R_up + down_bytes / R_down
    DSD   up_bytes       ~ g * |V| * b      (full Q rows),          down_bytes ~ small
    DSSD  up_bytes       ~ small (ids + q scalars),
          down_bytes     ~ (1 - a^g) * rejection payload            (full P_j: |V| * b; compact: less)
    tokens per second    = E[tokens per round] / round time

`t_draft` is one draft step on the device (one llama.cpp token + sampling), `t_verify`
the edge's verification of one round (a forward over about g + 1 tokens plus the
transform and the test); both are measured inputs, not modelled here. Acceptance may be
one rate `a` (i.i.d. assumption, as in the paper) or the conditional acceptance per
position `alphas` (alphas[i] = P(accept x_{i+1} | x_1..x_i accepted)). The device's
`RoundStats.acceptance_per_position()` reports the unconditional P(x_1..x_{i+1} all
accepted); `conditional_acceptance()` converts.

Byte counts are what a link charges: protocol frames (16-byte header + payload) inside
WebSocket frames (2-14 bytes of framing; device->edge frames carry a 4-byte mask).
TCP/IP headers are not counted (the link emulator shapes the TCP byte stream).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from protocol.modes import SPECULATIVE_MODES  # noqa: F401  (the modes this model prices)

#: Protocol frame header (protocol/wire.py).
FRAME_HEADER_BYTES = 16
#: Fixed part of a Draft payload (n_committed, n_prefix, gamma, q code, row length, ...).
#: Approximate: the exact value depends on the wire version; a few bytes either way.
DRAFT_HEAD_BYTES = 16
#: Fixed part of a Verdict payload (kind, n_accepted, token, downlink, count).
VERDICT_HEAD_BYTES = 12
#: Tokens payload head (done flag, count) in edge-only streaming.
TOKENS_HEAD_BYTES = 5
ID_BYTES = 4
FLOAT32_BYTES = 4


# -- units ---------------------------------------------------------------------------


def mbps(megabits_per_s: float) -> float:
    """Megabits per second (network units, 10^6 bits) -> bytes per second."""
    return megabits_per_s * 1e6 / 8.0


@dataclass(frozen=True)
class Link:
    """A symmetric-delay link: round-trip time and a rate per direction (bytes/s)."""

    rtt_s: float = 0.0
    up_bytes_per_s: float = math.inf  # device -> edge
    down_bytes_per_s: float = math.inf  # edge -> device

    @classmethod
    def from_mbps(cls, up_mbps: float, down_mbps: float | None = None, rtt_ms: float = 0.0) -> "Link":
        down = up_mbps if down_mbps is None else down_mbps
        return cls(rtt_ms / 1000.0, mbps(up_mbps), mbps(down))


def transfer_s(nbytes: float, bytes_per_s: float) -> float:
    """Serialisation time of `nbytes` at a rate (0 for an unlimited link)."""
    if nbytes <= 0 or math.isinf(bytes_per_s):
        return 0.0
    if bytes_per_s <= 0:
        raise ValueError("rate must be positive")
    return nbytes / bytes_per_s


# -- acceptance ----------------------------------------------------------------------


def expected_tokens_per_round(a: float, gamma: int) -> float:
    """(1 - a^(g+1)) / (1 - a): committed tokens per round, bonus/correction included.

    Assumes each draft token is accepted independently with probability `a`
    (the paper's eq. 7, from Leviathan et al.). gamma = 0 gives 1 (the edge decides).
    """
    _check_rate(a)
    if gamma < 0:
        raise ValueError("gamma must be >= 0")
    if a >= 1.0:
        return float(gamma + 1)
    return (1.0 - a ** (gamma + 1)) / (1.0 - a)


def expected_tokens_per_round_positions(alphas: Sequence[float]) -> float:
    """1 + sum_i prod_{k<=i} alphas[k]: the same with conditional acceptance per position.

    `alphas[i]` is P(accept x_{i+1} | x_1..x_i accepted); with all alphas equal to a this
    equals `expected_tokens_per_round(a, len(alphas))`.
    """
    total, reach = 1.0, 1.0
    for alpha in alphas:
        _check_rate(alpha)
        reach *= alpha
        total += reach
    return total


def conditional_acceptance(cumulative: Sequence[float]) -> list[float]:
    """Unconditional per-position rates P(x_1..x_{i+1} accepted) -> conditional alphas.

    alphas[0] = c[0], alphas[i] = c[i] / c[i-1] (0 once a position is never reached).
    `expected_tokens_per_round_positions(conditional_acceptance(c))` = 1 + sum(c).
    """
    alphas: list[float] = []
    prev = 1.0
    for c in cumulative:
        _check_rate(c)
        alphas.append(min(1.0, c / prev) if prev > 0 else 0.0)
        prev = c
    return alphas


def prob_all_accepted(a: float, gamma: int) -> float:
    """a^g: probability that a round ends with a bonus token (no rejection)."""
    _check_rate(a)
    return a**gamma


def prob_all_accepted_positions(alphas: Sequence[float]) -> float:
    return math.prod(alphas) if len(alphas) else 1.0


def acceptance_from_mean_length(mean_length: float, gamma: int, *, tol: float = 1e-9) -> float:
    """Invert `expected_tokens_per_round`: the i.i.d. rate a that gives this mean length."""
    if gamma <= 0:
        return 0.0
    if not 1.0 <= mean_length <= gamma + 1:
        raise ValueError(f"mean accepted length must be in [1, {gamma + 1}]")
    lo, hi = 0.0, 1.0
    while hi - lo > tol:  # monotone in a
        mid = (lo + hi) / 2
        if expected_tokens_per_round(mid, gamma) < mean_length:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _check_rate(a: float) -> None:
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"acceptance rate must be in [0, 1], got {a}")


# -- message sizes (wire v1, see docs/protocol.md) -------------------------------------


def ws_frame_bytes(payload_bytes: int, *, masked: bool) -> int:
    """Bytes on the TCP stream for one WebSocket binary message of `payload_bytes`."""
    if payload_bytes < 126:
        head = 2
    elif payload_bytes < 65536:
        head = 4
    else:
        head = 10
    return payload_bytes + head + (4 if masked else 0)


def draft_message_bytes(mode: str, gamma: int, n_vocab: int, *, greedy: bool, n_prefix: float = 0.0,
                        row_bytes: int = FLOAT32_BYTES) -> float:
    """Protocol frame bytes of one uplink Draft (without WebSocket framing).

    dsd carries gamma full Q rows (the wire sends them even when greedy); dssd and
    dssd-paper carry gamma q(x) scalars, or nothing more than ids when greedy.
    `n_prefix` is the (expected) number of resampled tokens carried from the last round.
    """
    ids = (gamma + n_prefix) * ID_BYTES
    if mode == "dsd":
        q = gamma * n_vocab * row_bytes
    elif mode in ("dssd", "dssd-paper"):
        q = 0 if greedy else gamma * FLOAT32_BYTES
    else:
        raise ValueError(f"no Draft message in mode {mode!r}")
    return FRAME_HEADER_BYTES + DRAFT_HEAD_BYTES + ids + q


def rejection_payload_bytes(downlink: str, n_vocab: int, *, support: int = 0, candidates: int = 0,
                            row_bytes: int = FLOAT32_BYTES) -> int:
    """Extra Verdict bytes that let the device resample after a rejection.

    downlink: "full" (|V| floats, the paper's DSSD), "support" (`support` (id, prob)
    pairs: top-k/top-p truncated P_j), "candidates" (`candidates` (id, prob) pairs drawn
    from P_j: candidate residual sampling), "none" (greedy, DSD: the token is decided).
    """
    if downlink == "full":
        return n_vocab * row_bytes
    if downlink == "support":
        return support * (ID_BYTES + FLOAT32_BYTES)
    if downlink == "candidates":
        return candidates * (ID_BYTES + FLOAT32_BYTES)
    if downlink == "none":
        return 0
    raise ValueError(f"unknown downlink {downlink!r}")


def verdict_message_bytes(p_reject: float, rejection_payload: float) -> float:
    """Expected protocol bytes of one downlink Verdict."""
    return FRAME_HEADER_BYTES + VERDICT_HEAD_BYTES + p_reject * rejection_payload


def ws_round_bytes(up_frame_bytes: float, down_frame_bytes: float) -> tuple[float, float]:
    """Add WebSocket framing to one round's protocol bytes (masked up, unmasked down)."""
    return (
        float(ws_frame_bytes(int(round(up_frame_bytes)), masked=True)),
        float(ws_frame_bytes(int(round(down_frame_bytes)), masked=False)),
    )


# -- round time and throughput --------------------------------------------------------


def round_time(gamma: int, t_draft: float, t_verify: float, link: Link,
               up_bytes: float, down_bytes: float) -> float:
    """g * t_draft + t_verify + RTT + up_bytes / R_up + down_bytes / R_down.

    The general form every speculative mode shares; the modes differ only in the bytes.
    Use measured (mean per round) bytes to check an implementation, or the expected
    bytes from `round_bytes` to predict one.
    """
    if gamma < 0 or t_draft < 0 or t_verify < 0:
        raise ValueError("gamma and component times must be >= 0")
    return (gamma * t_draft + t_verify + link.rtt_s
            + transfer_s(up_bytes, link.up_bytes_per_s) + transfer_s(down_bytes, link.down_bytes_per_s))


def round_bytes(mode: str, gamma: int, n_vocab: int, *, p_reject: float, greedy: bool,
                downlink: str = "full", support: int = 0, candidates: int = 0,
                row_bytes: int = FLOAT32_BYTES, websocket: bool = True) -> tuple[float, float]:
    """Expected (up, down) bytes of one round in `mode`.

    `p_reject` = 1 - P(all accepted). `downlink` is dssd's rejection encoding ("full",
    "support", "candidates"); dssd-paper always sends "full", dsd and greedy "none".
    """
    if greedy or mode == "dsd":
        payload = 0
    elif mode == "dssd-paper":
        payload = rejection_payload_bytes("full", n_vocab, row_bytes=row_bytes)
    elif mode == "dssd":
        payload = rejection_payload_bytes(downlink, n_vocab, support=support, candidates=candidates,
                                          row_bytes=row_bytes)
    else:
        raise ValueError(f"not a speculative mode: {mode!r}")
    resampled = 0.0 if (greedy or mode == "dsd") else p_reject  # next round's prefix token
    up = draft_message_bytes(mode, gamma, n_vocab, greedy=greedy, n_prefix=resampled, row_bytes=row_bytes)
    down = verdict_message_bytes(p_reject, payload)
    if websocket:
        # framing of the expected sizes: exact for fixed sizes, within bytes otherwise
        up = ws_frame_bytes(math.ceil(up), masked=True)
        down = (1 - p_reject) * ws_frame_bytes(FRAME_HEADER_BYTES + VERDICT_HEAD_BYTES, masked=False) + (
            p_reject * ws_frame_bytes(FRAME_HEADER_BYTES + VERDICT_HEAD_BYTES + payload, masked=False)
        )
    return float(up), float(down)


def pipelined_round_s(gamma: int, t_draft: float, wait_s: float, p_ahead: float) -> float:
    """Expected device-side round time when the device drafts ahead while a verdict flies.

    Without pipelining a round is `gamma * t_draft + wait_s`. With it, the next round's
    drafts (plus a guess of the bonus token) are made during the wait; they are used
    with probability `p_ahead` (all `gamma` drafts accepted and the guess equal to the
    edge's bonus). Then the round costs max(wait, (gamma + 1) * t_draft) instead of
    gamma * t_draft + wait; otherwise the draft is made after the verdict as usual.
    """
    if gamma <= 0:
        return wait_s
    ahead = max(wait_s, (gamma + 1) * t_draft)
    return p_ahead * ahead + (1.0 - p_ahead) * (gamma * t_draft + wait_s)


def paper_round_time(mode: str, gamma: int, a: float, t_draft: float, t_verify: float, link: Link,
                     n_vocab: int, row_bytes: int = FLOAT32_BYTES) -> float:
    """The paper's eqs. exactly (small terms dropped): DSD pays g|V|b up, DSSD (1-a^g)|V|b down."""
    base = gamma * t_draft + t_verify + link.rtt_s
    if mode == "dsd":
        return base + transfer_s(gamma * n_vocab * row_bytes, link.up_bytes_per_s)
    if mode in ("dssd", "dssd-paper"):
        return base + transfer_s((1 - a**gamma) * n_vocab * row_bytes, link.down_bytes_per_s)
    raise ValueError(f"not a speculative mode: {mode!r}")


def speculative_tokens_per_s(mode: str, gamma: int, a: float | Sequence[float], t_draft: float,
                             t_verify: float, link: Link, n_vocab: int, *, greedy: bool = False,
                             downlink: str = "full", support: int = 0, candidates: int = 0) -> float:
    """Predicted tokens/s of a speculative mode, from an acceptance rate or per-position alphas."""
    if isinstance(a, (int, float)):
        tokens = expected_tokens_per_round(float(a), gamma)
        p_all = prob_all_accepted(float(a), gamma)
    else:
        alphas = list(a)[:gamma]
        if len(alphas) < gamma:
            raise ValueError("need one acceptance rate per draft position")
        tokens = expected_tokens_per_round_positions(alphas)
        p_all = prob_all_accepted_positions(alphas)
    up, down = round_bytes(mode, gamma, n_vocab, p_reject=1 - p_all, greedy=greedy, downlink=downlink,
                           support=support, candidates=candidates)
    return tokens / round_time(gamma, t_draft, t_verify, link, up, down)


def edge_only_tokens_per_s(t_step: float, link: Link) -> float:
    """Edge-only streaming: the edge decodes while earlier tokens are in flight, so the
    slower of decoding and the downlink sets the rate (RTT only delays the first token)."""
    per_token = ws_frame_bytes(FRAME_HEADER_BYTES + TOKENS_HEAD_BYTES + ID_BYTES, masked=False)
    return 1.0 / max(t_step, transfer_s(per_token, link.down_bytes_per_s), 1e-12)


def device_only_tokens_per_s(t_draft: float) -> float:
    return 1.0 / t_draft if t_draft > 0 else math.inf


def optimal_gamma(
    alphas: Sequence[float] | float,
    t_draft: float,
    t_verify: Callable[[int], float] | float,
    link: Link,
    n_vocab: int,
    *,
    mode: str = "dssd",
    max_gamma: int = 8,
    greedy: bool = False,
    downlink: str = "full",
    support: int = 0,
    candidates: int = 0,
) -> tuple[int, float]:
    """The gamma in [0, max_gamma] with the highest predicted tokens/s, and that rate.

    `alphas`: one acceptance rate (i.i.d.) or per-position rates (positions past the
    end reuse the last one). `t_verify`: seconds, or a function of gamma.
    """
    best = (0, -1.0)
    for g in range(0, max_gamma + 1):
        if isinstance(alphas, (int, float)):
            a: float | list[float] = float(alphas)
        else:
            seq = list(alphas) or [0.0]
            a = [seq[min(i, len(seq) - 1)] for i in range(g)]
        tv = t_verify(g) if callable(t_verify) else t_verify
        rate = speculative_tokens_per_s(mode, g, a, t_draft, tv, link, n_vocab, greedy=greedy,
                                        downlink=downlink, support=support, candidates=candidates)
        if rate > best[1]:
            best = (g, rate)
    return best
