"""Per-device state on the edge: KV cache, request settings, randomness and statistics.

`EdgeSession` is the protocol state machine of one connection, free of network code:
decoded messages in, messages to send out. The server feeds it frames and runs it in a
worker thread; tests can drive it directly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from dssd_common.prefix import common_prefix_len
from edge_service.backends.base import KVBudgetExceeded, TargetModel, TargetSequence
from protocol import wire
from protocol.downlink import (
    DOWNLINKS,
    MAX_CANDIDATES,
    MAX_MORE_PER_ROUND,
    RowSupport,
    as_support,
    candidates_message,
    choose_downlink,
    encode_rejection,
)
from protocol import constraints
from protocol import logprobs as lp
from protocol.modes import EDGE_MODES as MODES  # the modes this edge serves
from protocol.sampling import (
    EDGE_STREAM,
    NonFiniteLogits,
    SamplingParams,
    draw,
    greedy_token,
    greedy_tokens,
    probabilities,
    rng_for,
)
from protocol.stats import RoundStats
from protocol.verification import Verdict, VerdictKind, dsd_verify, edge_verify, greedy_verify
from protocol.vocab import VocabMismatch, VocabPairing, Vocabulary, pair_vocabularies
from protocol.wire import MAX_SEED, ErrorCode

log = logging.getLogger(__name__)

#: Prompt tokens per prefill forward. A prefill keeps no logits; what is left of its
#: peak memory is the attention and MLP scratch of the tokens in one forward, so long
#: prompts go in chunks (2,000 tokens on the default pair: peak RSS +120 MB, the KV
#: cache itself, against +209 MB in one forward and +513 MB with every row's logits).
PREFILL_CHUNK = 256


@dataclass(frozen=True)
class EdgeLimits:
    """Caps that keep one client from making the verifier do unbounded work."""

    max_gamma: int = 16
    max_new_tokens: int = 2048
    max_context: int | None = None  # None: the model's own context
    max_frame_bytes: int = 8 * 1024 * 1024


class ProtocolError(Exception):
    """A request the edge refuses; becomes an Error frame with `code`."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@contextlib.contextmanager
def verification_errors() -> Iterator[None]:
    """Turn what the verification math refuses into the request's clear error.

    Non-finite target logits are the edge model's fault but not a transient one: a
    retry would meet them again, so they are refused (UNSUPPORTED) rather than reported
    as INTERNAL, which devices retry. Any other ValueError is an invalid draft (q
    values out of range, bad ids).
    """
    try:
        yield
    except ValueError as exc:
        raise refusal(exc) from None


def refusal(exc: ValueError) -> ProtocolError:
    """The ProtocolError for what the verification math refused (see `verification_errors`)."""
    if isinstance(exc, NonFiniteLogits):
        return ProtocolError(ErrorCode.UNSUPPORTED, f"the target model produced non-finite logits: {exc}")
    return ProtocolError(ErrorCode.UNSUPPORTED, f"invalid draft: {exc}")


@dataclass
class _Request:
    mode: str
    sampling: SamplingParams
    downlink: str
    max_new_tokens: int
    n_prompt: int
    rng: np.random.Generator
    stats: RoundStats
    committed: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # committed, not yet in the KV cache
    rejected: tuple[int, RowSupport] | None = None  # (j, P_j) while the device may ask for more
    more_in_round: int = 0  # More requests answered for the current rejection
    done: bool = False
    logprobs: int = lp.OFF  # alternatives per token the device asked for (OFF: no logprobs)
    #: log-softmax of the row of the last rejection, for the logprob of the token the
    #: device resamples there (it arrives as the next Draft's prefix, or in End)
    lp_carry: np.ndarray | None = None
    prefill_tokens: int = 0  # prompt tokens the KV cache did not hold already (Done stats)
    #: the output's grammar at the committed ids (protocol.constraints), None: free text
    constraint: constraints.Constraint | None = None


@dataclass
class PreparedRound:
    """A validated Draft waiting for its forward (see `EdgeSession.verify`)."""

    msg: wire.Draft
    request: _Request
    prefix: list[int]
    draft: np.ndarray
    new_ids: list[int]  # pending + prefix + draft: what the target's forward must append
    t0: float
    #: the shared id space [0, n_tokens) the rows are verified on (None: every row)
    n_tokens: int | None = None
    #: the round's gamma + 1 raw logits rows on the host, kept only for a request with
    #: logprobs (set by whichever path verifies the round)
    logits: np.ndarray | None = None

    @property
    def n_rows(self) -> int:
        """Logits rows the verification uses: those of the last gamma + 1 new ids."""
        return self.draft.size + 1


@dataclass
class PreparedStep:
    """An edge-only decode step waiting for its forward (see `EdgeSession.edge_only_step`)."""

    request: _Request
    new_ids: list[int]  # the pending token
    t0: float
    n_rows: int = 1


class EdgeSession:
    """One device connection: handshake, then requests of rounds."""

    def __init__(
        self,
        model: TargetModel,
        limits: EdgeLimits,
        session_id: int,
        *,
        auth_tokens: frozenset[str] = frozenset(),
        vocabulary: Vocabulary | None = None,
    ) -> None:
        """`vocabulary`: the model's (`protocol.vocab.Vocabulary`), computed once by the
        server (None: computed here, for sessions driven directly)."""
        self.model = model
        self._auth_tokens = auth_tokens
        self.limits = limits
        self.session_id = session_id
        self.vocabulary = vocabulary or Vocabulary.of(model.vocab_tokens, model.n_vocab)
        self.fingerprint = self.vocabulary.fingerprint
        #: set by the Hello: the shared id space [0, n_tokens) and the device's row width
        self.pairing: VocabPairing | None = None
        self.max_context = min(limits.max_context or model.max_context, model.max_context)
        self._seq: TargetSequence | None = None
        self._cached: list[int] = []  # token ids held in the KV cache, for prefix reuse
        self._request: _Request | None = None
        self._greeted = False
        self._p_rows: np.ndarray | None = None  # preallocated (max_gamma + 1, V) buffer
        #: a Start being prefilled: (msg, ids, t0, grammar constraint, tokens to prefill)
        self._starting: tuple[wire.Start, list[int], float, Any, int] | None = None
        self._grammar_tokenizer: Any = None  # built on the first constrained request

    # -- handshake ------------------------------------------------------------------

    def hello(self, msg: wire.Hello) -> wire.Welcome:
        if self._greeted:
            raise ProtocolError(ErrorCode.UNEXPECTED, "hello sent twice")
        if msg.protocol_version != wire.VERSION:
            raise ProtocolError(
                ErrorCode.VERSION,
                f"device speaks protocol {msg.protocol_version}, edge speaks {wire.VERSION}",
            )
        if self._auth_tokens and not any(
            hmac.compare_digest(msg.auth_token.encode(), t.encode()) for t in self._auth_tokens
        ):
            raise ProtocolError(ErrorCode.AUTH, "missing or wrong access token")
        try:
            self.pairing = pair_vocabularies(Vocabulary.announced(msg.vocab_fingerprint, msg.n_vocab), self.vocabulary)
        except VocabMismatch as exc:
            raise ProtocolError(ErrorCode.VOCAB_MISMATCH,
                                f"vocabulary mismatch with edge model {self.model.name}: {exc}") from None
        self._greeted = True
        return wire.Welcome(
            session_id=self.session_id,
            model=self.model.name,
            vocab_fingerprint=self.fingerprint,
            n_vocab=msg.n_vocab,  # the device's rows: the width of every row on this session's wire
            eos_token_ids=self.model.eos_token_ids,
            max_gamma=self.limits.max_gamma,
            max_context=self.max_context,
            max_new_tokens=self.limits.max_new_tokens,
            downlinks=DOWNLINKS,
        )

    # -- dispatch -------------------------------------------------------------------

    @property
    def greeted(self) -> bool:
        return self._greeted

    @property
    def streaming(self) -> bool:
        """True while an edge-only request still has tokens to produce."""
        r = self._request
        return r is not None and r.mode == "edge-only" and not r.done

    def handle(self, msg: wire.Message) -> list[wire.Message]:
        if not self._greeted:
            if isinstance(msg, wire.Hello):
                return [self.hello(msg)]
            raise ProtocolError(ErrorCode.UNEXPECTED, "the first frame must be a Hello")
        if isinstance(msg, wire.Start):
            return self.start(msg)
        if isinstance(msg, wire.Draft):
            return [self.verify(msg)]
        if isinstance(msg, wire.End):
            return [self.end(msg)]
        if isinstance(msg, wire.More):
            return [self.more(msg)]
        raise ProtocolError(ErrorCode.UNEXPECTED, f"unexpected {type(msg).__name__} frame")

    # -- requests -------------------------------------------------------------------

    def start(self, msg: wire.Start) -> list[wire.Message]:
        """A whole Start: `begin_start`, every `prefill_step`, `finish_start`."""
        self.begin_start(msg)
        while self.prefill_step():
            pass
        return self.finish_start()

    def begin_start(self, msg: wire.Start) -> None:
        """(a) Validate a Start, reserve its KV and keep the reusable cached prefix."""
        if self._starting is not None:
            raise ProtocolError(ErrorCode.UNEXPECTED, "a Start is already being prefilled")
        if self._request is not None and not self._request.done:
            raise ProtocolError(ErrorCode.UNEXPECTED, "a request is already running on this session")
        if msg.mode not in MODES:
            raise ProtocolError(ErrorCode.UNSUPPORTED, f"unknown mode {msg.mode!r}; edge modes: {MODES}")
        if msg.downlink not in DOWNLINKS:
            raise ProtocolError(ErrorCode.UNSUPPORTED, f"unknown downlink {msg.downlink!r}; supported: {DOWNLINKS}")
        if not 0 <= msg.seed <= MAX_SEED:
            raise ProtocolError(ErrorCode.UNSUPPORTED, "seed must be in [0, 2^63)")
        prompt = msg.prompt_ids
        if prompt.size == 0:
            raise ProtocolError(ErrorCode.UNSUPPORTED, "empty prompt")
        if prompt.min() < 0 or prompt.max() >= self._n_tokens:
            raise ProtocolError(ErrorCode.UNSUPPORTED,
                                f"prompt token id outside the {self._n_tokens} tokens of the vocabulary")
        if not lp.OFF <= msg.logprobs <= lp.MAX_TOP_LOGPROBS:
            raise ProtocolError(ErrorCode.UNSUPPORTED,
                                f"logprobs must be {lp.OFF} (off) or 0..{lp.MAX_TOP_LOGPROBS} alternatives")
        if not 1 <= msg.max_new_tokens <= self.limits.max_new_tokens:
            raise ProtocolError(
                ErrorCode.LIMIT, f"max_new_tokens must be in [1, {self.limits.max_new_tokens}]"
            )
        if prompt.size + msg.max_new_tokens > self.max_context:
            raise ProtocolError(
                ErrorCode.LIMIT,
                f"prompt ({prompt.size}) + max_new_tokens ({msg.max_new_tokens}) exceeds the "
                f"context of {self.max_context}",
            )
        ids = prompt.astype(np.int64).tolist()
        constraint = self._constraint(msg.grammar, ids) if msg.grammar is not None else None
        t0 = time.perf_counter()
        if self._seq is None:
            self._seq = self.model.new_sequence()
            self._cached = []
        try:  # the whole request's KV, held from now on (a LIMIT now, never an OOM later)
            self._seq.reserve(min(len(ids) + msg.max_new_tokens + self.limits.max_gamma + 1, self.max_context))
        except KVBudgetExceeded as exc:
            raise ProtocolError(ErrorCode.LIMIT, f"edge memory: {exc}") from None
        # reuse the longest cached common prefix (none if the cache was evicted meanwhile)
        keep = min(common_prefix_len(self._cached, ids[:-1]), self._seq.n_cached)
        self._seq.rollback(keep)
        self._cached = self._cached[:keep]
        self._starting = (msg, ids, t0, constraint, len(ids) - 1 - keep)

    def prefill_step(self, max_tokens: int = PREFILL_CHUNK) -> bool:
        """(b) Prefill the next at most `max_tokens` prompt tokens of the Start begun by
        `begin_start` in a forward of its own; True while more remain."""
        chunk = self.prefill_ids(max_tokens)
        if chunk:
            assert self._seq is not None
            self._seq.forward(chunk, keep=0)  # a prefill uses no logits
            self.absorb_prefill(chunk)
        return self.prefill_remaining > 0

    @property
    def prefill_remaining(self) -> int:
        """Prompt tokens the Start being prefilled still has to put in the cache (0: none,
        or no Start is being prefilled)."""
        if self._starting is None:
            return 0
        return len(self._starting[1]) - 1 - len(self._cached)

    def prefill_ids(self, max_tokens: int) -> list[int]:
        """(b1) The next at most `max_tokens` prompt ids to prefill. The scheduler feeds
        them, with no logits kept, in the same forward as other sessions' rounds
        (`edge_service.scheduler`), then calls `absorb_prefill`."""
        if self._starting is None:
            raise ProtocolError(ErrorCode.UNEXPECTED, "no Start is being prefilled")
        done = len(self._cached)
        return self._starting[1][done : done + min(max_tokens, self.prefill_remaining)]

    def absorb_prefill(self, ids: list[int]) -> None:
        """(b2) `ids` (from `prefill_ids`) went through a forward: the cache holds them."""
        self._cached.extend(ids)

    def abort_start(self) -> None:
        """The Start being prefilled failed (its forward did, or its client left): forget
        it; what the cache holds of its prompt stays reusable (`_cached` says what)."""
        self._starting = None

    def finish_start(self) -> list[wire.Message]:
        """(c) The prompt is in the cache: the request begins."""
        if self._starting is None or len(self._cached) != len(self._starting[1]) - 1:
            raise ProtocolError(ErrorCode.UNEXPECTED, "the Start's prefill is not complete")
        msg, ids, t0, constraint, n_prefilled = self._starting
        self._starting = None
        stats = RoundStats()
        stats.prefill_s = time.perf_counter() - t0
        self._request = _Request(
            mode=msg.mode,
            sampling=msg.sampling,
            downlink=choose_downlink(msg.mode, msg.downlink, msg.sampling),
            max_new_tokens=msg.max_new_tokens,
            n_prompt=len(ids),
            rng=rng_for(msg.seed, EDGE_STREAM),
            stats=stats,
            committed=ids,
            pending=ids[-1:],
            logprobs=msg.logprobs,
            prefill_tokens=n_prefilled,
            constraint=constraint,
        )
        return []

    def _constraint(self, grammar: dict[str, Any], ids: list[int]) -> constraints.Constraint:
        """The request's grammar compiled for this model's vocabulary, advanced over the
        output already generated (a resumed request); UNSUPPORTED when it cannot be."""
        try:
            spec = constraints.GrammarSpec.from_json(grammar)
            spec.check()
            if spec.offset > len(ids):
                raise constraints.ConstraintError("grammar offset beyond the prompt")
            if self._grammar_tokenizer is None:
                self._grammar_tokenizer = constraints.build_tokenizer(
                    self.model.vocab_tokens, self.model.eos_token_ids, self.model.n_vocab)
            c = constraints.Constraint(self._grammar_tokenizer, spec, self.model.n_vocab)
            c.advance(ids[spec.offset :])
            return c
        except constraints.ConstraintError as exc:
            raise ProtocolError(ErrorCode.UNSUPPORTED, f"grammar refused: {exc}") from None

    @staticmethod
    def constrain_round(prep: "PreparedRound") -> np.ndarray | None:
        """The grammar masks of a round's gamma + 1 rows (bit-packed), None if free text.

        Advances the grammar over the Draft's prefix (committed: the device's resample) and
        refuses a draft token the grammar forbids (the device applies the same mask, so Q
        gives such a token probability 0: it cannot have been sampled)."""
        c = prep.request.constraint
        if c is None:
            return None
        try:
            c.advance(prep.prefix)
        except constraints.ConstraintError as exc:
            raise ProtocolError(ErrorCode.UNSUPPORTED, f"invalid draft: {exc}") from None
        words, ok = c.masks(prep.draft.tolist())
        if ok < prep.draft.size:
            raise ProtocolError(ErrorCode.UNSUPPORTED,
                                f"invalid draft: token {int(prep.draft[ok])} at {ok} is not allowed by the grammar")
        return words

    def _require_request(self) -> _Request:
        r = self._request
        if r is None or r.done:
            raise ProtocolError(ErrorCode.UNEXPECTED, "no request is running: send Start first")
        return r

    def _keep(self, n_tokens: int) -> None:
        assert self._seq is not None
        self._seq.rollback(n_tokens)
        del self._cached[n_tokens:]

    @property
    def sequence(self) -> TargetSequence | None:
        """The session's KV-cache sequence (None before the first Start), for batched forwards."""
        return self._seq

    def verify(self, msg: wire.Draft) -> wire.VerdictMsg:
        """One DSSD / DSD round: forward pending + draft, verify, roll back, answer.

        The three steps are also callable apart, so that the verification scheduler can
        run the forwards of several sessions' rounds as one batch:
        `prepare_verify` -> `sequence.forward(prep.new_ids)` -> `finish_verify`.
        """
        prep = self.prepare_verify(msg)
        assert self._seq is not None
        return self.finish_verify(prep, self._seq.forward(prep.new_ids, prep.n_rows))

    def prepare_verify(self, msg: wire.Draft) -> PreparedRound:
        """(a) Validate a Draft and compute the ids the target must see; changes no state."""
        if not self._greeted:
            raise ProtocolError(ErrorCode.UNEXPECTED, "the first frame must be a Hello")
        r = self._require_request()
        if r.mode == "edge-only":
            raise ProtocolError(ErrorCode.UNEXPECTED, "drafts are not part of edge-only mode")
        prefix = msg.prefix_ids.astype(np.int64).tolist()
        draft = msg.draft_ids.astype(np.int64)
        gamma = draft.size
        n_tokens = self._n_tokens
        if len(r.committed) + len(prefix) != msg.n_committed:
            raise ProtocolError(
                ErrorCode.DESYNC,
                f"device says {msg.n_committed} committed tokens, edge has "
                f"{len(r.committed)} + {len(prefix)} new",
            )
        if gamma > self.limits.max_gamma:
            raise ProtocolError(ErrorCode.LIMIT, f"gamma {gamma} exceeds the cap of {self.limits.max_gamma}")
        if len(prefix) > 1 + self.limits.max_gamma:
            raise ProtocolError(ErrorCode.LIMIT, "too many prefix tokens in one draft")
        if not r.pending and not prefix:
            raise ProtocolError(ErrorCode.DESYNC, "the resampled token is missing from this draft")
        if r.logprobs != lp.OFF and (len(prefix) > 1 or (prefix and r.lp_carry is None)):
            raise ProtocolError(ErrorCode.DESYNC, "with logprobs, a draft's prefix is only the resampled token")
        if msg.n_committed - r.n_prompt >= r.max_new_tokens:
            raise ProtocolError(ErrorCode.LIMIT, "max_new_tokens already reached")
        if msg.n_committed + gamma + 1 > self.max_context:
            raise ProtocolError(ErrorCode.LIMIT, f"the sequence would exceed the context of {self.max_context}")
        ids = np.concatenate([np.asarray(prefix, np.int64), draft])
        if ids.size and (ids.min() < 0 or ids.max() >= n_tokens):
            raise ProtocolError(ErrorCode.UNSUPPORTED, f"token id outside the {n_tokens} tokens of the vocabulary")
        sampling = r.sampling
        needs_q = not sampling.greedy
        if r.mode == "dsd":
            # greedy DSD reads no Q row (the verdict is the target's argmax path), so a
            # device may leave the one-hot rows out; rows that do come must fit
            width = self._device_rows
            if (needs_q and msg.q_rows is None) or (msg.q_rows is not None and msg.q_rows.shape[1] != width):
                raise ProtocolError(ErrorCode.UNSUPPORTED, f"dsd drafts carry full Q rows of length {width}")
        elif needs_q and (msg.q_draft is None):
            raise ProtocolError(ErrorCode.UNSUPPORTED, "sampled dssd drafts carry q(x) for each token")

        t0 = time.perf_counter()
        return PreparedRound(msg, r, prefix, draft, r.pending + prefix + draft.tolist(), t0, n_tokens)

    @property
    def _n_tokens(self) -> int:
        """The shared id space of this session: ids at or beyond it are padding (P = Q = 0)."""
        return self.pairing.n_tokens if self.pairing is not None else int(self.vocabulary.n_tokens or 0)

    @property
    def _device_rows(self) -> int:
        """The device's row count: the width of Q rows up and full P_j rows down."""
        return self.pairing.device_rows if self.pairing is not None else self.model.n_vocab

    def finish_verify(self, prep: PreparedRound, logits: np.ndarray) -> wire.VerdictMsg:
        """(c) Verify against the target's logits for `prep.new_ids` (already appended to the
        sequence by `forward`; at least the last gamma + 1 rows), roll back to the accepted
        prefix, build the reply."""
        r, draft = prep.request, prep.draft
        logits = logits[logits.shape[0] - prep.n_rows :, : self._n_tokens]  # a view: padding ids have P = 0
        p_rows = None
        try:
            words = self.constrain_round(prep)
            if r.logprobs != lp.OFF:  # the raw rows: logprobs are the unmasked log-softmax
                prep.logits = logits if words is None else logits.copy()
            if words is not None:
                assert r.constraint is not None
                r.constraint.apply(logits, words)
            with verification_errors():
                if r.sampling.greedy:
                    verdict = greedy_verify(greedy_tokens(logits), draft)
                else:
                    p_rows = probabilities(logits, r.sampling, out=self._rows_buffer(prep.n_rows))
                    if r.mode == "dsd":
                        q_rows = prep.msg.q_rows[:, : self._n_tokens].astype(np.float32)
                        verdict = dsd_verify(p_rows, q_rows, draft, r.rng)
                    else:
                        verdict = edge_verify(p_rows, draft, prep.msg.q_draft, r.rng)
        except ProtocolError:
            self.absorb_failed(prep)
            raise
        return self.apply_verdict(prep, verdict, None if p_rows is None else p_rows[verdict.n_accepted])

    def absorb_failed(self, prep: PreparedRound) -> None:
        """Keep the token bookkeeping true to the KV cache after a refused verification
        (the forward already appended `prep.new_ids`)."""
        self._cached.extend(prep.new_ids)

    def apply_verdict(
        self, prep: PreparedRound, verdict: Verdict, p_j: np.ndarray | RowSupport | None
    ) -> wire.VerdictMsg:
        """(d) Commit a round's verdict: roll the cache back to the accepted prefix and build
        the reply; `p_j` (dense or its support) is the target row at the first rejection,
        needed only for a RESAMPLE verdict. Both the numpy path (`finish_verify`) and the
        torch path (`edge_service.torch_verify`) end here."""
        msg, r, prefix, draft, new, t0 = prep.msg, prep.request, prep.prefix, prep.draft, prep.new_ids, prep.t0
        gamma = draft.size
        logprobs = None if r.logprobs == lp.OFF else self._round_logprobs(prep, verdict)
        n_before = len(self._cached)
        self._cached.extend(new)
        r.committed.extend(prefix)
        j = verdict.n_accepted
        self._keep(n_before + len(new) - gamma + j)
        r.committed.extend(draft[:j].tolist())
        if r.constraint is not None:
            r.constraint.advance(draft[:j].tolist() + ([] if verdict.kind is VerdictKind.RESAMPLE else [verdict.token]))
        r.rejected = None
        r.more_in_round = 0
        if verdict.kind is VerdictKind.RESAMPLE:
            assert p_j is not None
            r.pending = []
            reply = encode_rejection(verdict, p_j, r.downlink, msg.n_candidates, r.rng, width=self._device_rows)
            if reply.candidates:
                r.rejected = (j, as_support(p_j))
        else:
            r.committed.append(verdict.token)
            r.pending = [verdict.token]
            reply = wire.VerdictMsg(verdict.kind, j, verdict.token)
        if logprobs is not None:
            reply = dataclasses.replace(reply, logprobs=logprobs)
        r.stats.record_round(gamma, j, time.perf_counter() - t0)
        return reply

    @staticmethod
    def _round_logprobs(prep: PreparedRound, verdict: Verdict) -> lp.TokenLogprobs:
        """The target's logprobs of the tokens this verdict settles (see `wire.VerdictMsg`):
        the prefix token from the carried row, then rows 0..j of the round; a RESAMPLE
        carries row j's log-softmax to the next frame."""
        r, k, j = prep.request, prep.request.logprobs, verdict.n_accepted
        assert prep.logits is not None, "the verification path must keep the rows of a logprobs request"
        parts = []
        if prep.prefix:
            assert r.lp_carry is not None
            parts.append(lp.of_rows(r.lp_carry[np.newaxis], prep.prefix[:1], k))
        tokens = prep.draft[:j].tolist()
        if verdict.kind is not VerdictKind.RESAMPLE:
            tokens.append(verdict.token)
        lsm = lp.log_softmax(prep.logits[: j + 1])
        parts.append(lp.of_rows(lsm[: len(tokens)], np.asarray(tokens, np.int64), k))
        r.lp_carry = lsm[j] if verdict.kind is VerdictKind.RESAMPLE else None
        return lp.TokenLogprobs.concat(parts, k)

    def more(self, msg: wire.More) -> wire.VerdictMsg:
        """The device's candidates all failed: more candidates, or the full P_j (n = 0)."""
        r = self._require_request()
        if r.rejected is None:
            raise ProtocolError(ErrorCode.UNEXPECTED, "no candidate rejection is pending")
        if msg.n_candidates > MAX_CANDIDATES:
            raise ProtocolError(ErrorCode.LIMIT, f"at most {MAX_CANDIDATES} candidates per message")
        if r.more_in_round >= MAX_MORE_PER_ROUND:
            raise ProtocolError(ErrorCode.LIMIT, f"more than {MAX_MORE_PER_ROUND} More requests for one rejection")
        r.more_in_round += 1
        j, p_row = r.rejected
        r.stats.more_requests += 1
        if msg.n_candidates == 0:
            r.rejected = None
            return wire.VerdictMsg(VerdictKind.RESAMPLE, j, p_full=p_row.dense(self._device_rows))
        return candidates_message(j, p_row, msg.n_candidates, r.rng)

    def _rows_buffer(self, n: int) -> np.ndarray:
        if self._p_rows is None:
            self._p_rows = np.empty((self.limits.max_gamma + 1, self._n_tokens), np.float32)
        return self._p_rows[:n]

    def edge_only_step(self) -> wire.Tokens:
        """Edge-only decoding: one target token per call (the server streams them)."""
        step = self.prepare_edge_only_step()
        assert self._seq is not None
        return self.finish_edge_only_step(step, self._seq.forward(step.new_ids, keep=1)[0])

    def prepare_edge_only_step(self) -> "PreparedStep":
        """(a) The ids the next edge-only step feeds (the pending token); changes no state.
        The scheduler batches these with verification rounds."""
        r = self._require_request()
        return PreparedStep(r, list(r.pending), time.perf_counter())

    def finish_edge_only_step(self, step: "PreparedStep", logits: np.ndarray) -> wire.Tokens:
        """(b) Draw the token from the step's logits row (`step.new_ids` already appended)."""
        r = step.request
        self._cached.extend(step.new_ids)
        logits = logits[: self._n_tokens]  # a view: padding ids have P = 0
        raw = logits
        if r.constraint is not None:
            words, _ = r.constraint.masks([])
            raw = logits.copy() if r.logprobs != lp.OFF else logits
            r.constraint.apply(logits, words[0])
        with verification_errors():
            if r.sampling.greedy:  # no one-hot row: nothing reads it
                token = greedy_token(logits)
            else:
                token = draw(logits, r.sampling, r.rng, self._rows_buffer(1)[0])
        r.committed.append(token)
        r.pending = [token]
        if r.constraint is not None:
            r.constraint.advance([token])
        logprobs = None if r.logprobs == lp.OFF else lp.of_logits(raw, np.array([token]), r.logprobs)
        r.stats.record_round(0, 0, time.perf_counter() - step.t0)
        generated = len(r.committed) - r.n_prompt
        r.done = (
            generated >= r.max_new_tokens
            or token in self.model.eos_token_ids
            or len(r.committed) >= self.max_context
        )
        return wire.Tokens(np.array([token], np.int32), done=r.done, logprobs=logprobs)

    def end(self, msg: wire.End) -> wire.Done:
        r = self._request
        if r is None:
            raise ProtocolError(ErrorCode.UNEXPECTED, "no request to end")
        tail = None
        if msg.prefix_ids and r.logprobs != lp.OFF:  # the logprob of the last, resampled token
            if len(msg.prefix_ids) != 1 or r.lp_carry is None or not 0 <= msg.prefix_ids[0] < self.model.n_vocab:
                raise ProtocolError(ErrorCode.DESYNC, "End: the prefix must be the one token resampled last")
            tail = lp.as_json(lp.of_rows(r.lp_carry[np.newaxis], msg.prefix_ids, r.logprobs))
        r.done = True
        self._request = None
        if self._seq is not None:
            self._seq.idle()  # kept for prefix reuse; evictable under memory pressure
        stats: dict[str, Any] = r.stats.as_dict()
        if tail is not None:
            stats["logprobs"] = tail
        stats["committed"] = len(r.committed)
        stats["prefill_tokens"] = r.prefill_tokens
        stats["device_committed"] = msg.n_committed
        return wire.Done(stats)

    def close(self) -> None:
        if self._seq is not None:
            self._seq.release()
            self._seq = None
        self._cached = []
        self._request = None
        self._starting = None
