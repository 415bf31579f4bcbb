"""The device's round loop for each mode, over one `EdgeLink`.

Modes: "dssd" (split verification, compact downlink), "dssd-paper" (full fp32 P_j down,
as published), "dsd" (full Q rows up, edge verifies alone), "edge-only" (the edge
decodes and streams), "device-only" (the draft model alone, no edge).
"""
from __future__ import annotations

import asyncio
import codecs
import dataclasses
import logging
import ssl
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from websockets.exceptions import WebSocketException

from device_runtime.drafter import Draft, LlamaDrafter
from device_runtime import defaults
from device_runtime.gamma import GammaController
from device_runtime.rounds import AwaitAhead, DraftJob, RoundMachine, SendDraft, SendMore
from device_runtime.transport import EdgeError, EdgeLink, EdgeUnreachable, parse_edge_urls
from protocol import wire
from protocol.affinity import check_key, new_key
from protocol.checks import check_tokens
from protocol.checks import check_logprobs, check_tokens
from protocol import constraints
from protocol import logprobs as lp
from protocol.modes import MODES
from protocol.sampling import DEVICE_STREAM, SamplingParams, resume_seed, rng_for
from protocol.stats import RoundStats
from protocol.wire import MAX_SEED

log = logging.getLogger(__name__)

#: on_tokens(ids, text, verified[, logprobs]): committed ids, the text now safe to show,
#: whether the target verified them (False for fallback tokens from the draft alone), and,
#: only for a request with logprobs (a fourth argument, so a three-argument callback keeps
#: working), the target's (logprob, [(id, logprob)...]) of each id (None where it is
#: unknown: a fallback token, or one resampled just before a lost edge).
LogprobEntry = tuple[float, list[tuple[int, float]]]
TokenCallback = Callable[..., None]
#: Edge errors that mean "the edge is gone for now", not "this request is wrong": worth a
#: reconnection once the request has run on the edge. AUTH, VOCAB_MISMATCH, VERSION,
#: LIMIT, ... never heal by retrying; an INTERNAL is retried once, a second one is final.
TRANSIENT_EDGE_ERRORS = (wire.ErrorCode.BUSY, wire.ErrorCode.SHUTDOWN, wire.ErrorCode.INTERNAL)
#: Answers that mean "this edge cannot take the session, another may": full (BUSY) or
#: draining / shutting down (SHUTDOWN, sent with WebSocket close code 1001). A device
#: moves on to the next edge URL, or reconnects through the balancer, after either.
MOVE_EDGE_ERRORS = (wire.ErrorCode.BUSY, wire.ErrorCode.SHUTDOWN)


def _moved(exc: Exception) -> bool:
    """The edge is there but cannot take the session now (busy, draining): another may."""
    if isinstance(exc, EdgeError):
        return exc.code in MOVE_EDGE_ERRORS
    return isinstance(exc, EdgeUnreachable) and exc.unavailable


class EdgeLost(ConnectionError):
    """The edge was lost mid-request and could not be reached again (fallback off)."""


@dataclass(frozen=True)
class FailoverPolicy:
    """How hard a device tries to move a session when its edge is lost, busy or draining.

    A *reconnection* tries every edge URL once, starting with the one after the URL that
    failed (behind a load balancer there is one URL, and the balancer picks a replica).
    A request may spend `attempts` reconnections in a row without a verified token in
    between (a verified token resets the count), so a replica that keeps dying cannot hold
    a request forever; the first is immediate, the n-th waits backoff_s * 2**(n-2), at most
    `max_backoff_s`. Tests count attempts, never time them.
    """

    attempts: int = 5
    backoff_s: float = 0.25
    max_backoff_s: float = 4.0

    def __post_init__(self) -> None:
        if self.attempts < 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("failover attempts and backoff must be >= 0")

    def delay(self, failure: int) -> float:
        """Seconds to wait before the `failure`-th reconnection in a row (the first: none)."""
        return 0.0 if failure <= 1 else min(self.backoff_s * 2 ** (failure - 2), self.max_backoff_s)


@dataclass(frozen=True)
class GenerationConfig:
    """One request's settings; the defaults (device_runtime.defaults) are the CLI's, the
    library's and `serve`'s."""

    mode: str = defaults.MODE
    max_new_tokens: int = defaults.MAX_NEW_TOKENS
    sampling: SamplingParams = defaults.SAMPLING
    #: None: adaptive gamma (GammaController) up to max_gamma; an int: fixed gamma.
    gamma: int | None = defaults.GAMMA
    seed: int = defaults.SEED
    stop: tuple[str, ...] = ()
    downlink: str = defaults.DOWNLINK
    max_gamma: int = defaults.MAX_GAMMA
    #: Keep drafting while a verdict is in flight (work kept when all drafts pass).
    pipeline: bool = defaults.PIPELINE
    #: Opt-in continuity: when an edge that accepted this request's Hello is lost and one
    #: immediate reconnection fails, keep generating with the draft alone (tokens flagged
    #: as not verified) and resume exact decoding on reconnection. False (the default)
    #: raises `EdgeLost` instead. An edge never reached is always an error.
    fallback: bool = False
    #: Candidates asked for per rejection with the candidates downlink; None: adaptive.
    n_candidates: int | None = None
    #: A verdict that takes longer than this counts as a lost edge.
    round_timeout_s: float = 30.0
    max_backoff_s: float = 8.0
    #: -1: none; k >= 0: the target's logprob of each token and its k best alternatives
    #: (protocol.logprobs; not in device-only mode, where there is no target)
    logprobs: int = lp.OFF
    #: the output's grammar (JSON schema / Lark, protocol.constraints); None: free text.
    #: Both sides mask their logits with it; drafting ahead is off for such requests.
    grammar: constraints.GrammarSpec | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.gamma is not None and self.gamma < 0:
            raise ValueError("gamma must be >= 0 (or None for adaptive)")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, {MAX_SEED}]")
        if self.n_candidates is not None and not 1 <= self.n_candidates <= 255:
            raise ValueError("n_candidates must be in [1, 255] (or None for adaptive)")
        if not lp.OFF <= self.logprobs <= lp.MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be {lp.OFF} (off) or 0..{lp.MAX_TOP_LOGPROBS} alternatives")
        if self.logprobs != lp.OFF and self.mode == "device-only":
            raise ValueError("logprobs are the target's: device-only mode has none (the draft's are not exact)")


@dataclass
class GenerationStats:
    mode: str
    prompt_tokens: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    ttft_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    rounds: RoundStats = field(default_factory=RoundStats)
    edge: dict[str, Any] = field(default_factory=dict)
    gammas: list[int] = field(default_factory=list)  # gamma of each round
    pipelined_kept: int = 0  # draft tokens prepared while waiting and used
    pipelined_discarded: int = 0
    #: drafting the device waited for (in line, after the first round, whose draft includes
    #: the prompt's prefill); of it, the drafts that followed a round whose drafts all
    #: passed: what any draft-ahead pipeline could at best have hidden
    draft_s: float = 0.0
    hideable_draft_s: float = 0.0
    unverified_tokens: int = 0  # produced by the draft alone while the edge was lost
    fallback_events: int = 0
    reconnects: int = 0
    #: connections tried for this request (each edge URL tried counts), and the replica
    #: (the Welcome's id, else the URL) of each connection the request ran on, in order
    connect_attempts: int = 0
    replicas: list[str] = field(default_factory=list)
    #: per round: tokens committed, and where its drafts came from ("inline": drafted after
    #: the previous verdict; "ahead": all drafted while it was in flight; "extended": made
    #: ahead and finished in line). A trace for diagnostics and the law tests.
    round_tokens: list[int] = field(default_factory=list)
    round_sources: list[str] = field(default_factory=list)
    #: generated tokens committed when the request was resumed on a new connection
    resumed_at: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def bytes_per_token(self) -> float:
        return (self.bytes_up + self.bytes_down) / self.tokens if self.tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rounds"] = self.rounds.as_dict()
        d["acceptance_per_position"] = [round(a, 4) for a in self.rounds.acceptance_per_position()]
        d["tokens_per_s"] = round(self.tokens_per_s, 3)
        d["bytes_per_token"] = round(self.bytes_per_token, 2)
        return d

    def summary(self) -> str:
        r = self.rounds
        lines = [
            f"mode {self.mode}: {self.tokens} tokens in {self.wall_s:.2f} s "
            f"({self.tokens_per_s:.1f} tok/s), time to first token {self.ttft_s * 1000:.0f} ms",
        ]
        if r.rounds:
            per_pos = " ".join(f"{a:.2f}" for a in r.acceptance_per_position())
            lines.append(
                f"  rounds {r.rounds}, drafted {r.draft_tokens}, accepted {r.accepted_tokens} "
                f"(rate {r.acceptance_rate:.2f}), mean accepted length {r.mean_accepted_length:.2f}"
            )
            lines.append(f"  acceptance per position: {per_pos}")
            g = self.gammas
            lines.append(
                f"  gamma per round: mean {sum(g) / len(g):.2f} (min {min(g)}, max {max(g)}); "
                f"pipelined drafts kept {self.pipelined_kept}, discarded {self.pipelined_discarded}"
            )
        if self.unverified_tokens or self.fallback_events:
            lines.append(
                f"  NOT VERIFIED: {self.unverified_tokens} tokens from the draft alone "
                f"({self.fallback_events} edge losses, {self.reconnects} reconnects)"
            )
        if self.bytes_up or self.bytes_down:
            lines.append(
                f"  bytes up {self.bytes_up}, down {self.bytes_down}, "
                f"{self.bytes_per_token:.1f} bytes per token"
            )
        return "\n".join(lines)


@dataclass
class GenerationResult:
    ids: list[int]
    text: str
    finish_reason: str  # "eos" | "length" | "stop"
    stats: GenerationStats
    verified: list[bool] = field(default_factory=list)  # per token: checked by the target
    #: per token, with logprobs: the target's (logprob, top alternatives), None where unknown
    logprobs: list["LogprobEntry | None"] | None = None

    @property
    def exact(self) -> bool:
        """True when every token was verified by the target (no fallback)."""
        return all(self.verified)


class StopText:
    """The visible text of a generation, with stop strings handled exactly while streaming.

    Text that could be the start of a stop string is held back until it is clear; the
    final text ends right before the first stop string.    EOS ids are not shown.)
    """

    def __init__(self, detokenize: Callable[[list[int]], bytes], eos: Sequence[int], stops: Sequence[str]) -> None:
        self._detokenize = detokenize
        self._eos = set(eos)
        self._stops = tuple(stops)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.raw = ""
        self.sent = 0
        self.stopped_at: int | None = None

    @property
    def text(self) -> str:
        return self.raw if self.stopped_at is None else self.raw[: self.stopped_at]

    def feed(self, ids: Sequence[int]) -> str:
        """Decode committed ids; returns the text that is now safe to show."""
        if self.stopped_at is not None:
            return ""
        visible = [int(t) for t in ids if t not in self._eos]
        if visible:
            self.raw += self._decoder.decode(self._detokenize(visible))
        limit = len(self.raw)
        if self._stops:
            hits = [i for i in (self.raw.find(s, self.sent) for s in self._stops) if i >= 0]
            if hits:
                self.stopped_at = limit = min(hits)
            else:
                limit = next((i for i in range(max(self.sent, len(self.raw) - max(map(len, self._stops))),
                                               len(self.raw))
                              if any(s.startswith(self.raw[i:]) for s in self._stops)), limit)
        out = self.raw[self.sent : limit] if limit > self.sent else ""
        self.sent = max(self.sent, limit)
        return out

    def finish(self) -> str:
        """At the end: held-back text that turned out not to start a stop string."""
        end = len(self.raw) if self.stopped_at is None else self.stopped_at
        out = self.raw[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out


class _Output:
    """Commits tokens: EOS / length / stop-string handling and streaming, for every mode."""

    def __init__(
        self,
        drafter: LlamaDrafter,
        config: GenerationConfig,
        eos_ids: Sequence[int],
        on_tokens: TokenCallback | None,
        t0: float,
    ) -> None:
        self.ids: list[int] = []
        self.verified: list[bool] = []
        self.finish_reason = ""
        self._config = config
        self.eos = set(eos_ids)
        self._on_tokens = on_tokens
        self._shown = StopText(drafter.detokenize, eos_ids, config.stop)
        self._t0 = t0
        self.ttft_s = 0.0
        #: with logprobs: per committed id, once known; events wait in `_held` until their
        #: ids' logprobs are in (a resampled id's comes with the next verdict)
        self.logprobs: list[LogprobEntry | None] | None = None if config.logprobs == lp.OFF else []
        self._held: list[tuple[list[int], str, bool]] = []
        self._n_shown = 0  # ids handed to on_tokens

    @property
    def text(self) -> str:
        return self._shown.text

    @property
    def missing_logprobs(self) -> int:
        """Committed ids whose logprobs have not arrived (0 or 1 in practice)."""
        return 0 if self.logprobs is None else len(self.ids) - len(self.logprobs)

    def add_logprobs(self, block: lp.TokenLogprobs | None) -> None:
        """The target's logprobs of the next ids in order (extras past the committed ids,
        cut by EOS / length, are dropped); releases the events they complete."""
        if self.logprobs is None or block is None:
            return
        self.logprobs.extend(block.entries()[: self.missing_logprobs])
        self._flush()

    def settle_missing(self) -> None:
        """Logprobs that can no longer arrive (the edge was lost) are None."""
        if self.logprobs is not None:
            self.logprobs.extend([None] * self.missing_logprobs)
            self._flush()

    def _emit(self, ids: list[int], piece: str, verified: bool) -> None:
        if self._on_tokens is None:
            return
        if self.logprobs is None:
            self._on_tokens(ids, piece, verified)
            return
        self._held.append((ids, piece, verified))
        self._flush()

    def _flush(self) -> None:
        while self._held and self.logprobs is not None and self._on_tokens is not None:
            ids, piece, verified = self._held[0]
            end = self._n_shown + len(ids)
            if len(self.logprobs) < end:
                return
            self._held.pop(0)
            self._on_tokens(ids, piece, verified, self.logprobs[self._n_shown : end])
            self._n_shown = end

    def commit(self, ids: Sequence[int], verified: bool = True, logprobs: lp.TokenLogprobs | None = None) -> bool:
        """Append committed ids (and the logprobs that came with them); returns True when
        generation is finished."""
        new: list[int] = []
        for tok in ids:
            new.append(int(tok))
            if tok in self.eos:
                self.finish_reason = "eos"
                break
            if len(self.ids) + len(new) >= self._config.max_new_tokens:
                self.finish_reason = "length"
                break
        if not new:
            return bool(self.finish_reason)
        if not self.ids:
            self.ttft_s = time.perf_counter() - self._t0
        self.ids.extend(new)
        self.verified.extend([verified] * len(new))
        piece = self._shown.feed(new)
        if self._shown.stopped_at is not None:
            self.finish_reason = "stop"
        if not verified and self.logprobs is not None:
            self.settle_missing()  # a draft-alone token has no target logprob
        self._emit(new, piece, verified)
        self.add_logprobs(logprobs)
        return bool(self.finish_reason)

    def finish(self) -> None:
        """Stream the held-back text that turned out not to start a stop string."""
        self.settle_missing()
        tail = self._shown.finish()
        if tail:
            self._emit([], tail, self.verified[-1] if self.verified else True)


class DeviceClient:
    """Runs generation requests for one drafter, against one edge connection (lazily opened).

    `edge_url`: one URL, several (a sequence, or comma-separated), or None (device-only).
    With several, the first is where the client starts and the others are where it moves,
    in turn, when its edge is lost, busy or draining (`failover`). `session_key` is the
    affinity key a load balancer hashes on (protocol/affinity.py); default: a random key
    for this client, kept across its reconnections.
    """

    def __init__(
        self,
        drafter: LlamaDrafter,
        edge_url: str | Sequence[str] | None = None,
        *,
        client_name: str = "",
        auth_token: str = "",
        ssl_context: "ssl.SSLContext | None" = None,
        session_key: str | None = None,
        failover: FailoverPolicy = FailoverPolicy(),
    ) -> None:
        self.drafter = drafter
        self.edge_urls = parse_edge_urls(edge_url)
        self._current = 0  # index of the edge URL in use, or tried first
        self.client_name = client_name
        self.auth_token = auth_token
        self.ssl_context = ssl_context
        self.session_key = check_key(session_key) if session_key else new_key()
        self.failover = failover
        self.connect_attempts = 0  # every edge URL tried, over this client's life
        self._link: EdgeLink | None = None
        self._fingerprint = drafter.vocabulary.fingerprint  # of the real tokens (protocol.vocab)
        # adaptive gamma: one controller per (mode, sampling, max gamma, pipelining), kept
        # across requests, since acceptance and timings depend on these and not the prompt
        self._controllers: dict[tuple[Any, ...], GammaController] = {}
        self._grammar_tokenizers: dict[tuple[int, ...], Any] = {}  # per EOS set, built on first use

    def constraint(self, spec: constraints.GrammarSpec, eos_ids: Sequence[int]) -> constraints.Constraint:
        """A fresh matcher of `spec` over the drafter's vocabulary (the edge builds the same)."""
        key = tuple(eos_ids)
        if key not in self._grammar_tokenizers:
            self._grammar_tokenizers[key] = constraints.build_tokenizer(
                self.drafter.vocab_tokens(), key, self.drafter.n_vocab)
        return constraints.Constraint(self._grammar_tokenizers[key], spec, self.drafter.n_vocab)

    def gamma_controller(self, config: GenerationConfig, max_gamma: int) -> GammaController | None:
        """The learned controller for this kind of request (None for a fixed gamma)."""
        if config.gamma is not None:
            return None
        key = (config.mode, config.sampling, max_gamma, config.pipeline)
        if key not in self._controllers:
            self._controllers[key] = GammaController(max_gamma, pipeline=config.pipeline)
        return self._controllers[key]

    @property
    def edge_url(self) -> str | None:
        """The edge URL in use (or tried next); None without an edge."""
        return self.edge_urls[self._current] if self.edge_urls else None

    async def connect(self, *, retry: bool = False) -> EdgeLink:
        """The open link, or a new session on the first edge URL that accepts one.

        Each URL is tried once, from the current one on: an edge that is unreachable (for
        now), busy or draining passes to the next; a permanent cause (TLS, wrong scheme, not
        an edge, AUTH, vocabulary, a bad Welcome) raises at once. With `retry`, when every
        edge answered BUSY or SHUTDOWN, the sweep is repeated under the failover policy's
        backoff (at most `failover.attempts` more times) before that answer is raised; an
        HTTP 503 at the upgrade (a draining edge, a balancer with no replica free) counts
        as BUSY.
        """
        if self._link is not None:
            return self._link
        if not self.edge_urls:
            raise ValueError("this mode needs an edge: pass edge_url (ws://HOST:PORT)")
        failures = 0
        while True:
            try:
                return await self._open()
            except (EdgeError, EdgeUnreachable) as exc:
                failures += 1
                if not retry or not _moved(exc) or failures > self.failover.attempts:
                    raise
                delay = self.failover.delay(failures + 1)
                log.warning("no edge took the session (%s); trying again in %.2f s", exc, delay)
                await asyncio.sleep(delay)

    async def _open(self) -> EdgeLink:
        """One sweep over the edge URLs (see `connect`); raises a busy/draining answer if any
        edge gave one (worth retrying), else the last error."""
        hello = wire.Hello(wire.VERSION, self._fingerprint, self.drafter.n_vocab, self.client_name,
                           self.auth_token)
        moved: Exception | None = None
        error: Exception | None = None
        for i in range(len(self.edge_urls)):
            index = (self._current + i) % len(self.edge_urls)
            url = self.edge_urls[index]
            self.connect_attempts += 1
            try:
                link = await EdgeLink.connect(url, hello, ssl_context=self.ssl_context, key=self.session_key)
            except (EdgeUnreachable, EdgeError) as exc:
                if exc.permanent if isinstance(exc, EdgeUnreachable) else not _moved(exc):
                    raise  # TLS, wrong scheme, AUTH, vocabulary...: no other edge will do better
                error = exc
                if _moved(exc):
                    moved = moved or exc
            else:
                self._current, self._link = index, link
                log.info("connected to edge %s (replica %s, model %s)", url, link.welcome.replica or "?",
                         link.welcome.model)
                return link
            if len(self.edge_urls) > 1:
                log.warning("edge %s: %s; trying the next edge", url, error)
        assert error is not None
        raise moved or error

    def _move_on(self) -> None:
        """After losing the edge in use, the next connection starts at the next URL."""
        if self.edge_urls:
            self._current = (self._current + 1) % len(self.edge_urls)

    async def close(self) -> None:
        if self._link is not None:
            link, self._link = self._link, None
            try:
                await asyncio.wait_for(link.close(), 5.0)
            except (OSError, asyncio.TimeoutError, WebSocketException):
                pass

    async def generate(
        self,
        prompt_ids: Sequence[int],
        config: GenerationConfig,
        on_tokens: TokenCallback | None = None,
    ) -> GenerationResult:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("empty prompt")
        t0 = time.perf_counter()
        stats = GenerationStats(mode=config.mode, prompt_tokens=len(prompt))
        rng = rng_for(config.seed, DEVICE_STREAM)
        out = _Output(self.drafter, config, self.drafter.eos_token_ids, on_tokens, t0)
        if config.grammar is not None:
            config.grammar.check()  # engine, version, kind: refused here before anything runs
        if config.mode == "device-only":
            self._alone(prompt, config, out, rng)
        else:
            await self._with_edge(prompt, config, out, stats, rng)
        out.finish()
        stats.tokens = len(out.ids)
        stats.unverified_tokens = out.verified.count(False)
        stats.wall_s = time.perf_counter() - t0
        stats.ttft_s = out.ttft_s
        return GenerationResult(out.ids, out.text, out.finish_reason or "length", stats, out.verified,
                                out.logprobs)

    async def _with_edge(
        self,
        prompt: list[int],
        config: GenerationConfig,
        out: _Output,
        stats: GenerationStats,
        rng: np.random.Generator,
    ) -> None:
        """Run the request on the edge, moving it exactly when its edge is lost.

        An edge that never accepted this request's Hello (refused, DNS, TLS, wrong
        scheme, AUTH, VOCAB_MISMATCH, VERSION) is a configuration error: it raises at
        once, before any token; only a busy or draining edge is waited for (bounded, see
        `connect(retry=True)`). Once the request ran on an edge, a lost connection (or
        BUSY / SHUTDOWN / a first INTERNAL) moves it: the next connection goes to the next
        edge URL (or through the balancer to another replica) under `self.failover`;
        when the reconnections run out it raises `EdgeLost`, or with `config.fallback`
        (after the first immediate one failed) generates with the draft alone (flagged)
        while reconnecting under exponential backoff.

        A moved request restarts on its new edge from everything committed so far (the
        edge prefills it), so no committed token is lost or duplicated. The round in
        flight when the edge was lost is redone with fresh randomness: the device's
        generator goes on (never rewound), and the edge gets a seed derived from the
        attempt number (reusing the edge's stream would correlate the redone round with
        decisions already made). That keeps the target's law because whether a round is
        lost does not depend on its draws (a kill, a dropped connection or a drain happen
        whatever was drafted; a draining edge never abandons a round it took): see
        docs/protocol.md, "Failover".
        """
        attempts0 = self.connect_attempts
        try:
            await self._run_moving(prompt, config, out, stats, rng)
        finally:
            stats.connect_attempts = self.connect_attempts - attempts0

    async def _run_moving(
        self,
        prompt: list[int],
        config: GenerationConfig,
        out: _Output,
        stats: GenerationStats,
        rng: np.random.Generator,
    ) -> None:
        await self.connect(retry=True)  # nothing ran yet: a misconfigured edge raises here
        fallback_backoff = 0.25
        attempt = 0  # (re)starts of this request on an edge: the edge seed's index
        failures = 0  # reconnections in a row without a verified token in between
        verified_at_loss = 0
        internal_errors = 0
        while not out.finish_reason:
            link = None
            try:
                link = await self.connect()
                stats.replicas.append(link.welcome.replica or link.url)
                if attempt:
                    stats.reconnects += 1
                    stats.resumed_at.append(len(out.ids))
                await self._request(link, prompt, config, out, stats, rng, attempt)
                return
            except (ConnectionError, OSError, asyncio.TimeoutError, WebSocketException, EdgeError) as exc:
                if link is not None:
                    stats.bytes_up += link.bytes_up
                    stats.bytes_down += link.bytes_down
                await self.close()
                out.settle_missing()  # the lost edge kept the row of a resampled token
                if isinstance(exc, EdgeError):
                    internal_errors += exc.code == wire.ErrorCode.INTERNAL
                    if exc.code not in TRANSIENT_EDGE_ERRORS or internal_errors > 1:
                        raise
                if isinstance(exc, EdgeUnreachable) and exc.permanent:
                    raise
                if out.finish_reason:  # the output is complete; only the edge's Done was lost
                    return
                attempt += 1
                if link is not None:
                    self._move_on()
                verified = out.verified.count(True)
                failures = 1 if verified > verified_at_loss else failures + 1
                verified_at_loss = verified
                if config.fallback and failures > 1:
                    stats.fallback_events += 1
                    log.warning("edge unreachable (%s); generating UNVERIFIED for %.2f s (--fallback)", exc,
                                fallback_backoff)
                    deadline = time.perf_counter() + fallback_backoff
                    fb = None  # the grammar holds for draft-alone tokens too (the edge resumes on them)
                    if config.grammar is not None:
                        fb = self.constraint(config.grammar, sorted(out.eos))
                        fb.advance(out.ids)
                    while not out.finish_reason and time.perf_counter() < deadline:
                        tok = self.drafter.next_token(prompt + out.ids, config.sampling, rng, fb)
                        if fb is not None:
                            fb.advance([tok])
                        out.commit([tok], verified=False)
                    fallback_backoff = min(fallback_backoff * 2, config.max_backoff_s)
                    continue
                if failures > self.failover.attempts:
                    raise EdgeLost(f"lost the edge at {self.edge_url} mid-generation after {verified} verified "
                                   f"tokens ({failures - 1} reconnections failed): {exc}") from exc
                delay = self.failover.delay(failures)
                log.warning("edge connection lost (%s); reconnecting%s", exc,
                            f" in {delay:.2f} s" if delay else "")
                if delay:
                    await asyncio.sleep(delay)

    async def _request(
        self,
        link: EdgeLink,
        prompt: list[int],
        config: GenerationConfig,
        out: _Output,
        stats: GenerationStats,
        rng: np.random.Generator,
        attempt: int,
    ) -> None:
        """One request on one connection, from everything committed so far."""
        up0, down0 = link.bytes_up, link.bytes_down
        out.eos = set(link.welcome.eos_token_ids)  # the target decides where its output ends
        committed = prompt + out.ids
        grammar = constraint = None
        if config.grammar is not None:
            grammar = dataclasses.replace(config.grammar, offset=len(prompt))
            constraint = self.constraint(grammar, link.welcome.eos_token_ids)
            constraint.advance(out.ids)
        await link.send(
            wire.Start(
                mode=config.mode,
                sampling=config.sampling,
                seed=resume_seed(config.seed, attempt),
                max_new_tokens=config.max_new_tokens - len(out.ids),
                prompt_ids=np.asarray(committed, np.int32),
                downlink=config.downlink,
                logprobs=config.logprobs,
                grammar=None if grammar is None else grammar.as_json(),
            )
        )
        tail: list[int] = []
        if config.mode == "edge-only":
            await self._edge_only(link, out, config)
        else:
            tail = await self._speculate(link, committed, config, out, stats, rng, constraint)
        # a last resampled id whose logprob the edge has not sent yet goes back in End
        tail = tail[-1:] if out.missing_logprobs else []
        await link.send(wire.End(len(prompt) + len(out.ids), tuple(tail)))
        while True:  # edge-only may still have tokens in flight before Done
            msg = await link.recv((wire.Done, wire.Tokens), timeout=config.round_timeout_s)
            if isinstance(msg, wire.Done):
                stats.edge = dict(msg.stats)
                if tail:
                    out.add_logprobs(_tail_logprobs(stats.edge.pop("logprobs", None), config.logprobs,
                                                    self.drafter.n_vocab))
                break
        stats.bytes_up += link.bytes_up - up0
        stats.bytes_down += link.bytes_down - down0

    def _alone(
        self, prompt: list[int], config: GenerationConfig, out: _Output, rng: np.random.Generator
    ) -> None:
        """Device-only decoding: the draft model alone (fast, draft quality)."""
        committed = list(prompt)
        c = None if config.grammar is None else self.constraint(config.grammar, self.drafter.eos_token_ids)
        while True:
            tok = self.drafter.next_token(committed, config.sampling, rng, c)
            if c is not None:
                c.advance([tok])
            committed.append(tok)
            if out.commit([tok]):
                return

    async def _edge_only(self, link: EdgeLink, out: _Output, config: GenerationConfig) -> None:
        while True:
            msg = await link.recv(wire.Tokens, timeout=config.round_timeout_s)
            check_tokens(msg, n_vocab=self.drafter.n_vocab, remaining=config.max_new_tokens - len(out.ids))
            if config.logprobs != lp.OFF:
                check_logprobs(msg.logprobs, n=msg.ids.size, k=config.logprobs, n_vocab=self.drafter.n_vocab,
                               where="Tokens frame")
            if out.commit(msg.ids.tolist(), logprobs=msg.logprobs) or msg.done:
                return

    async def _speculate(
        self,
        link: EdgeLink,
        committed: list[int],
        config: GenerationConfig,
        out: _Output,
        stats: GenerationStats,
        rng: np.random.Generator,
        constraint: constraints.Constraint | None = None,
    ) -> list[int]:
        """dssd / dssd-paper / dsd rounds until EOS, length or a stop string: the I/O and
        the drafter around a `RoundMachine`, which decides everything else. Drafting (in
        line and pipelined) runs on a worker thread, never on the event loop. Returns the
        committed ids the edge has not seen (the last round's resampled id, if any)."""
        max_gamma = min(config.gamma if config.gamma is not None else config.max_gamma,
                        link.welcome.max_gamma, self.drafter.max_gamma)
        m = RoundMachine(config, stats, committed, len(out.ids), rng, max_gamma=max_gamma,
                         n_vocab=self.drafter.n_vocab, control=self.gamma_controller(config, max_gamma))
        loop = asyncio.get_running_loop()
        background: asyncio.Future | None = None
        act = m.start()
        try:
            while True:
                if isinstance(act, DraftJob):
                    act = m.draft_ready(await loop.run_in_executor(None, self._draft, act, config, None,
                                                                   constraint))
                elif isinstance(act, SendDraft):
                    await link.send(act.frame, round=act.round)
                    job = m.sent()
                    if job is not None:
                        background = loop.run_in_executor(None, self._draft, job, config, m.keep_going)
                    act = m.verdict_arrived(await link.recv(wire.VerdictMsg, timeout=config.round_timeout_s))
                elif isinstance(act, AwaitAhead):
                    assert background is not None
                    guess, background = await background, None
                    act = m.ahead_ready(*guess)
                elif isinstance(act, SendMore):
                    await link.send(act.frame)
                    act = m.more_answer(await link.recv(wire.VerdictMsg, timeout=config.round_timeout_s))
                else:  # a Commit
                    if constraint is not None:  # the grammar follows the committed ids
                        constraint.advance(act.ids)
                    if out.commit(act.ids, logprobs=act.logprobs):
                        return m.prefix
                    act = m.next_round()
        finally:
            if background is not None:  # never leave the drafter busy on another thread
                m.edge_lost()
                await asyncio.wait([background])

    def _draft(self, job: DraftJob, config: GenerationConfig,
               keep_going: Callable[[np.ndarray], bool] | None,
               constraint: constraints.Constraint | None = None) -> Draft | tuple[Draft, float]:
        """Run a `DraftJob` (on a worker thread); a pipelined one also returns its duration."""
        t0 = time.perf_counter()
        d = self.drafter.draft(job.base, job.n, config.sampling, job.rng, slot=job.slot,
                               keep_going=keep_going, start=job.start, constraint=constraint)
        return (d, time.perf_counter() - t0) if job.ahead else d



def _tail_logprobs(obj: object, k: int, n_vocab: int) -> lp.TokenLogprobs:
    """The logprob of the request's last, resampled id, from `Done` (checked as a frame's)."""
    try:
        block = lp.from_json(obj, k)
    except ValueError as exc:
        raise wire.Malformed(f"the edge sent an invalid Done: {exc}") from None
    check_logprobs(block, n=1, k=k, n_vocab=n_vocab, where="Done")
    return block
