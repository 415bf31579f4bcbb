"""Adaptive draft length: each round, the gamma that maximises expected tokens per second.

A fixed gamma is wrong for most links, models and prompts ("speculation made it
slower"). The controller learns, online and with exponential forgetting:
- the conditional acceptance per draft position, alpha_i = P(accept x_i | x_1..x_{i-1}
  accepted), from each round's outcome;
- the draft cost per token on this device (from drafts made in line and from pipelined
  ones, never from a request's first round, which includes the prompt's prefill);
- the wait for a verdict as a line in gamma, wait(g) = c0 + c1 * g, which folds RTT, the
  edge's verify time and the bytes on the link (large c1 for DSD's full Q rows); like the
  round times below, never from a request's first round (its wait includes the edge's
  prefill of the prompt), which teaches acceptance only.
It then picks argmax_g E[tokens | g] / round_time(g) over 0..max_gamma, with E from
`protocol.costmodel`; round_time(g) is g * t_draft + wait(g), or with pipelining the
expected time when the next draft is made during the wait whenever all g drafts and the
bonus guess pass (a draft that nearly always passes then costs almost nothing, however
long). `planned_next` tells the pipelined drafter how many tokens to prepare (when the
next `choose` wants more, the device drafts the rest in line). Gamma 0 (the edge decides
one token per round) wins when drafting does not pay.

Exploration is a close-call check, not a fixed tax: every few rounds it plays the best
of the gammas predicted within `explore_margin` of the leader whose measurements have
gone stale (decayed below `stale_below` rounds). A clear leader with fresh rivals is
never interrupted (a near-perfect draft stays at the top gamma), a flat curve keeps
every close candidate measured, and a leader that only looks best because a rival's
measurement was unlucky gets that rival re-measured, whichever rank it sits at.

Where it has recent data for a gamma, the controller trusts the round time it measured
there (the whole round as the device lived it: drafting, waiting, pipelined drafts
finishing, resampling) over the model, weighting the two by how much data it has. The
model only has to be right about gammas it has not tried lately; effects it does not
model (CPU contention between the pipelined drafter and a co-located edge, Python
overhead) are then still accounted for where it matters. The model itself is first
scaled by the ratio of measured to modelled time over all recent rounds: an optimistic
model would otherwise make every rarely measured gamma look better than the leader, whose
estimate is mostly measurement.

One controller lives as long as its device client: what it learned about the link and
the models carries from one request to the next (the decay forgets a changed link).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from protocol.costmodel import expected_tokens_per_round_positions, pipelined_round_s


#: --gamma auto ranges over 0..this by default: a draft that nearly always passes keeps
#: paying beyond 8 (pipelined, its long drafts are mostly made during the wait)
DEFAULT_MAX_GAMMA = 12


@dataclass
class GammaController:
    max_gamma: int = DEFAULT_MAX_GAMMA
    initial_gamma: int = 4
    decay: float = 0.97  # per round; ~33 rounds of memory (acceptance changes with the prompt)
    prior_alpha: float = 0.6
    #: how many (decayed) rounds of evidence a position's prior, the estimate of the
    #: position before it, counts for: strong enough that one unlucky rejection at a
    #: rarely reached position does not rule its gamma out for good
    prior_weight: float = 8.0
    explore_every: int = 4
    #: candidates predicted within this fraction of the leader's rate are worth a look
    explore_margin: float = 0.9
    #: ... when measured less than this many (decayed) rounds lately
    stale_below: float = 0.5
    #: the device drafts ahead while a verdict is in flight (GenerationConfig.pipeline)
    pipeline: bool = False
    history_len: int = 256
    #: how many decayed rounds of measurement count as much as the model
    model_weight: float = 2.0
    _reached: np.ndarray = field(init=False)
    _accepted: np.ndarray = field(init=False)
    _t_draft: float | None = field(default=None, init=False)
    _sums: np.ndarray = field(default_factory=lambda: np.zeros(5), init=False)  # n, g, g^2, w, g*w
    _rounds: int = field(default=0, init=False)
    _round_n: np.ndarray = field(init=False)  # per gamma: decayed count of measured rounds
    _round_s: np.ndarray = field(init=False)  # per gamma: decayed sum of their durations
    _cal: np.ndarray = field(default_factory=lambda: np.zeros(2), init=False)  # measured, modelled
    history: list[int] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self._reached = np.zeros(self.max_gamma)
        self._accepted = np.zeros(self.max_gamma)
        self._round_n = np.zeros(self.max_gamma + 1)
        self._round_s = np.zeros(self.max_gamma + 1)

    def alphas(self) -> np.ndarray:
        """Current conditional acceptance estimates per position.

        Each position shrinks toward the estimate of the position before it (the first
        toward `prior_alpha`): a position rarely reached inherits what the controller knows
        about the ones before it instead of a fixed guess, so a draft that is almost always
        accepted is not held back by positions it has not tried yet.
        """
        out = np.empty(self.max_gamma)
        prior = self.prior_alpha
        for i in range(self.max_gamma):
            prior = out[i] = (self._accepted[i] + prior * self.prior_weight) / (self._reached[i] + self.prior_weight)
        return out

    def wait_line(self) -> tuple[float, float]:
        """(c0, c1) of wait(g) = c0 + c1 * g by decayed least squares (c1 >= 0)."""
        n, sg, sgg, sw, sgw = self._sums
        if n <= 0:
            return 0.0, 0.0
        var = sgg / n - (sg / n) ** 2
        c1 = max((sgw / n - sg / n * sw / n) / var, 0.0) if var > 1e-6 else 0.0
        c0 = max(sw / n - c1 * sg / n, 0.0)
        return c0, c1

    def model_round_s(self) -> np.ndarray:
        """The cost model's round time for every gamma in 0..max_gamma (no measurements)."""
        c0, c1 = self.wait_line()
        alphas = self.alphas()
        t_draft = self._t_draft or 0.0
        out = np.empty(self.max_gamma + 1)
        for gamma in range(self.max_gamma + 1):
            wait = c0 + c1 * gamma
            if self.pipeline and gamma > 0:
                # drafts ahead are used when all gamma pass and the bonus guess matches, which
                # is about as likely as one more acceptance
                p_ahead = float(np.prod(alphas[:gamma])) * float(alphas[min(gamma, self.max_gamma - 1)])
                out[gamma] = pipelined_round_s(gamma, t_draft, wait, p_ahead)
            else:
                out[gamma] = gamma * t_draft + wait
        return out

    def calibration(self) -> float:
        """Measured over modelled round time, over all recent rounds: the overheads the model
        leaves out. Scaling the model by it keeps a gamma measured rarely from looking better
        than the measured leader just because the model is optimistic."""
        measured, modelled = self._cal
        return measured / modelled if modelled > 0 else 1.0

    def expected_rates(self) -> np.ndarray:
        """Predicted committed tokens per second for every gamma in 0..max_gamma: the
        calibrated model, blended per gamma with the round times measured there."""
        alphas = self.alphas()
        t = self.model_round_s() * self.calibration()
        t = (self._round_s + self.model_weight * t) / (self._round_n + self.model_weight)
        tokens = np.array([expected_tokens_per_round_positions(alphas[:g]) for g in range(self.max_gamma + 1)])
        return tokens / np.maximum(t, 1e-9)

    def expected_rate(self, gamma: int) -> float:
        """Predicted committed tokens per second at this gamma."""
        return float(self.expected_rates()[gamma])

    def _ready(self) -> bool:
        return self._t_draft is not None and self._sums[0] >= 2

    def _pick(self, round_index: int) -> int:
        """The gamma for round `round_index`: the best predicted, or every `explore_every`
        rounds the best close call whose measurements are stale (see the module doc)."""
        if not self._ready():
            return min(self.initial_gamma, self.max_gamma)
        rates = self.expected_rates()
        best = int(np.argmax(rates))
        if round_index % self.explore_every == self.explore_every - 1:
            due = (rates >= self.explore_margin * rates[best]) & (self._round_n < self.stale_below)
            due[best] = False
            if due.any():
                return int(np.argmax(np.where(due, rates, -np.inf)))
        return best

    def choose(self) -> int:
        """This round's gamma (recorded in `history`)."""
        gamma = self._pick(self._rounds)
        self.history.append(gamma)
        if len(self.history) > 2 * self.history_len:
            del self.history[: -self.history_len]
        return gamma

    def planned_next(self) -> int:
        """What `choose` will most likely return next round, asked while this round's verdict
        is in flight: how many tokens a pipelined draft should prepare."""
        return self._pick(self._rounds + 1)

    def observe(self, gamma: int, n_accepted: int, wait_s: float, round_s: float, *, timed: bool = True) -> None:
        """One round's outcome: accepted prefix length, time waited for the verdict, and
        the whole round's duration as the device lived it.

        `timed=False` for a request's first round: its wait includes the edge's prefill of
        the prompt, which would make whatever gamma it played look slow (and tilt the wait
        line) for a dozen rounds; only its acceptance is learned.
        """
        if timed:
            self._cal *= self.decay
            if self._ready():
                self._cal += (round_s, self.model_round_s()[gamma])
            self._round_n *= self.decay
            self._round_s *= self.decay
            self._round_n[gamma] += 1
            self._round_s[gamma] += round_s
            self._sums *= self.decay
            self._sums += (1.0, gamma, gamma * gamma, wait_s, gamma * wait_s)
        self._rounds += 1
        self._reached *= self.decay
        self._accepted *= self.decay
        reached = min(n_accepted + 1, gamma)  # positions 1..n_accepted+1 were tested
        self._reached[:reached] += 1
        self._accepted[:n_accepted] += 1

    def observe_draft(self, seconds: float, n_tokens: int) -> None:
        """Time to draft `n_tokens` after a short re-sync of the drafter's cache.

        Fed from rounds drafted in line and from pipelined drafts (with pipelining and a
        good draft almost every round's draft is made ahead, so those are most samples);
        never from a request's first round, which includes the prompt's prefill.
        """
        if n_tokens > 0 and seconds > 0:
            per_token = seconds / n_tokens
            self._t_draft = per_token if self._t_draft is None else 0.8 * self._t_draft + 0.2 * per_token
