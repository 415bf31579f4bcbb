"""Cross-session verification batching: many devices' rounds, one forward of the target.

A round (`Draft`) from any session is queued here instead of being run on its own. The
dispatcher takes the queue in arrival order and flushes a batch when

* it holds `max_batch` rounds (the batch is full), or
* every connected session is waiting in it (nobody else can join), or
* `window_ms` has passed since the oldest round arrived, or since the previous batch
  finished if that is later (the batch window: the sessions just answered get the
  chance to send their next round and join, instead of alternating with the others),

then runs the batch on the server's single model worker thread in three steps:

1. `EdgeSession.prepare_verify` for each round: validation and the ids to feed (a
   refused round fails alone, the others go on);
2. one `TargetModel.forward_batch` over the rounds' sequences (the torch backend packs
   the new tokens into one row and attends each session over its own KV slot in place,
   edge_service/kv_slots.py; a backend without batching, such as the ONNX one, runs its
   default loop of per-sequence forwards);
3. `EdgeSession.finish_verify` for each round on its own logits rows: each session's
   sampling settings, randomness, rollback and reply are its own, so the verdicts are
   exactly those of the unbatched path.

While a batch runs on the worker, new rounds gather for the next one (continuous
batching); a lone round with an idle worker waits at most `window_ms`.

Edge-only decode steps (`step`) join the same queue and the same forwards as the rounds
(continuous batching: one pending token and one logits row each), unless
`batch_edge_only` is off.

A `Start` (`start`) is validated and its KV reserved in one worker job; its prompt is
then prefilled in pieces that ride in the same forwards as the rounds (vLLM-style
chunked prefill, keeping no logits), and the request is set up in a last job. Why: a
prefill that runs as a forward of its own makes every round that arrives meanwhile wait
for it, and on a CPU edge even a 32-token chunk costs about what a batch of 8 rounds
does (p99 of those rounds 1.64x their usual, `python -m benchmarks prefill`). The piece
size follows a per-forward token budget (`token_budget`): a forward that carries rounds
gets what they leave of the budget (at least a quarter of it, so a full queue cannot
starve a prompt), and a forward with no round in it gets the whole budget while other
sessions are connected (a round that arrives meanwhile waits for one forward of
`token_budget` tokens at most), or `prefill_chunk` tokens when the prompt's session is
alone. Several prompts being prefilled share a forward's piece in arrival order.

Fairness: each session has at most one round or step in flight (the protocol is
request-reply), batches are taken first-in first-out, so a round waits for at most
ceil(sessions / max_batch) batches plus the one running. `More`
and `End` go through the same worker queue, in arrival order, between batches.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from edge_service.backends.base import TargetModel
from edge_service.metrics import EdgeMetrics
from edge_service.session import PREFILL_CHUNK, EdgeSession, PreparedRound, PreparedStep, ProtocolError
from protocol import wire
from protocol.wire import ErrorCode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchConfig:
    """Verification batching settings of an edge server."""

    enabled: bool = True
    window_ms: float = 3.0  # how long a queued round waits for company once the worker is free
    max_batch: int = 16  # rounds per forward; the batch is flushed as soon as it is full
    #: verify on the logits' device (edge_service.torch_verify) when the backend is torch;
    #: False: logits to the host, numpy (the reference path, and the ONNX backend's)
    torch_verify: bool = True
    #: most prompt tokens one forward prefills (0: a whole prompt in one forward, the
    #: unchunked baseline)
    prefill_chunk: int = PREFILL_CHUNK
    #: most tokens (rounds' plus prefill) in a forward while other sessions are
    #: connected: prefill pieces fill what the rounds leave (at least a quarter of it).
    #: 0: no budget, prefill pieces of `prefill_chunk` whatever else the forward holds
    token_budget: int = 48
    #: edge-only decode steps join the verification batches (continuous batching);
    #: False: each step is its own forward on the worker
    batch_edge_only: bool = True

    def __post_init__(self) -> None:
        if self.window_ms < 0:
            raise ValueError("window_ms must be >= 0")
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if self.prefill_chunk < 0:
            raise ValueError("prefill_chunk must be >= 0")
        if self.token_budget < 0:
            raise ValueError("token_budget must be >= 0")

    @property
    def effective_max_batch(self) -> int:
        return self.max_batch if self.enabled else 1

    def prefill_tokens(self, round_tokens: int, shared: bool) -> int:
        """Prompt tokens a forward may prefill next to `round_tokens` tokens of rounds;
        `shared`: other sessions are connected (their rounds would wait for it)."""
        cap = self.prefill_chunk or (1 << 62)
        if self.token_budget and (shared or round_tokens):
            cap = min(cap, max(self.token_budget - round_tokens, self.token_budget // 4, 1))
        return cap


@dataclass
class _Prefill:
    """A session whose Start is being prefilled, in pieces inside the batches."""

    session: EdgeSession
    future: asyncio.Future  # set to None when the prompt is in the cache


@dataclass
class _Job:
    session: EdgeSession
    msg: wire.Draft | None  # None: an edge-only decode step
    future: asyncio.Future
    t_arrival: float


Runner = Callable[..., Awaitable[Any]]


class VerifyScheduler:
    """Queues rounds from all sessions and verifies them in batches on the model worker.

    `run(fn, *args)` must execute `fn` on the server's single model worker thread (the
    same one every other session operation uses). `active()` is the number of sessions
    connected, used to flush without waiting when all of them are already queued.
    """

    def __init__(
        self,
        model: TargetModel,
        config: BatchConfig,
        run: Runner,
        *,
        metrics: EdgeMetrics | None = None,
        active: Callable[[], int] | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self._run = run
        self._metrics = metrics
        self._active = active
        self._queue: collections.deque[_Job] = collections.deque()
        self._prefills: list[_Prefill] = []  # Starts being prefilled, in arrival order
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self._free_since = 0.0  # when the previous batch finished
        self._prefilling = 0  # sessions inside a Start (they cannot join a batch)
        self.batches = 0  # forwards run (for tests and logs)
        self.rounds = 0
        self.prefill_tokens_with_rounds = 0  # prompt tokens prefilled in forwards that carried rounds
        self.max_tokens_with_rounds = 0  # most tokens in one forward that carried rounds
        from edge_service.backends.torch_backend import TorchTargetModel

        self._torch_verify = config.torch_verify and isinstance(model, TorchTargetModel)

    async def submit(self, session: EdgeSession, msg: wire.Draft) -> wire.VerdictMsg:
        """Verify one round; returns its Verdict or raises its `ProtocolError`."""
        return await self._enqueue(session, msg)

    async def step(self, session: EdgeSession) -> wire.Tokens:
        """One edge-only decode step of `session`, batched with the verification rounds
        (one new token, one logits row: the cheapest member of a batch)."""
        if not self.config.batch_edge_only:
            return await self._run(session.edge_only_step)
        return await self._enqueue(session, None)

    async def start(self, session: EdgeSession, msg: wire.Start) -> list[wire.Message]:
        """A Start: validated and its KV reserved on the worker, its prompt prefilled in
        pieces inside the batches (see the module docstring), then the request set up."""
        self._prefilling += 1
        try:
            await self._run(session.begin_start, msg)
            try:
                if session.prefill_remaining:
                    future = self._loop_future()
                    self._prefills.append(_Prefill(session, future))
                    self._wake_dispatcher()
                    await future
                return await self._run(session.finish_start)
            except BaseException:
                session.abort_start()
                raise
        finally:
            self._prefilling -= 1

    def _loop_future(self) -> asyncio.Future:
        if self._closed:
            raise ProtocolError(ErrorCode.SHUTDOWN, "the edge is shutting down")
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._dispatch_loop(), name="verify-scheduler")
        return loop.create_future()

    def _wake_dispatcher(self) -> None:
        assert self._wake is not None
        self._wake.set()

    async def _enqueue(self, session: EdgeSession, msg: wire.Draft | None) -> Any:
        job = _Job(session, msg, self._loop_future(), time.perf_counter())
        self._queue.append(job)
        self._wake_dispatcher()
        return await job.future

    async def close(self) -> None:
        """Stop dispatching; rounds still queued are answered SHUTDOWN."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        waiting = [job.future for job in self._queue] + [p.future for p in self._prefills]
        self._queue.clear()
        self._prefills.clear()
        for future in waiting:
            if not future.done():
                future.set_exception(ProtocolError(ErrorCode.SHUTDOWN, "the edge is shutting down"))

    # -- dispatcher (event loop) --------------------------------------------------------

    def _full(self) -> bool:
        n = len(self._queue)
        if n >= self.config.effective_max_batch:
            return True
        return self._active is not None and n >= self._active() - self._prefilling

    def _shared(self) -> bool:
        """Other sessions than the ones prefilling are connected (they may send rounds)."""
        return self._active is None or self._active() > self._prefilling

    async def _dispatch_loop(self) -> None:
        assert self._wake is not None
        window = self.config.window_ms / 1000.0 if self.config.enabled else 0.0
        while True:
            self._prefills = [p for p in self._prefills if not p.future.done()]  # clients gone
            while not self._queue and not self._prefills:
                self._wake.clear()
                await self._wake.wait()
                self._prefills = [p for p in self._prefills if not p.future.done()]
            # wait for company: rounds for a batch, or rounds to carry a prefill piece
            # (when nobody else is connected, a prefill does not wait)
            while not self._full() and (self._queue or self._shared()):
                since = self._queue[0].t_arrival if self._queue else 0.0
                remaining = max(since, self._free_since) + window - time.perf_counter()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch: list[_Job] = []
            while self._queue and len(batch) < self.config.effective_max_batch:
                job = self._queue.popleft()
                if not job.future.done():  # a cancelled waiter (connection gone) is skipped
                    batch.append(job)
            prefills = [p for p in self._prefills if not p.future.done()]
            if not batch and not prefills:
                continue
            try:
                results, finished = await self._run(self._execute, batch, prefills, self._shared())
            except asyncio.CancelledError:
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(ProtocolError(ErrorCode.SHUTDOWN, "the edge is shutting down"))
                raise
            except BaseException as exc:  # noqa: BLE001 - each waiter gets the failure
                results, finished = [exc] * len(batch), [(p, exc) for p in prefills]
            now = self._free_since = time.perf_counter()
            for job, result in zip(batch, results):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
                if self._metrics is not None and job.msg is not None:
                    self._metrics.verify_latency.observe(now - job.t_arrival)
            for prefill, outcome in finished:
                if prefill in self._prefills:
                    self._prefills.remove(prefill)
                if not prefill.future.done():
                    if outcome is None:
                        prefill.future.set_result(None)
                    else:
                        prefill.future.set_exception(outcome)

    # -- one batch (model worker thread) ---------------------------------------------

    def _execute(self, batch: list[_Job], prefills: list[_Prefill], shared: bool
                 ) -> tuple[list[Any], list[tuple[_Prefill, BaseException | None]]]:
        """Prepare, forward together, finish. Returns one result (reply or exception)
        per job, and the prefills that ended in this forward: (prefill, None) when its
        prompt is all in the cache, (prefill, exception) when it failed.

        Verification rounds come first in the forward, edge-only steps after them, so
        the rounds' logits rows are one contiguous block; prefill pieces come last and
        keep no logits rows.
        """
        results: list[Any] = [None] * len(batch)
        ready: list[tuple[int, PreparedRound]] = []
        steps: list[tuple[int, PreparedStep]] = []
        for k, job in enumerate(batch):
            try:
                if job.msg is None:
                    steps.append((k, job.session.prepare_edge_only_step()))
                else:
                    ready.append((k, job.session.prepare_verify(job.msg)))
            except Exception as exc:  # noqa: BLE001 - a refused round fails alone
                results[k] = exc
        jobs: list[tuple[int, Any]] = [*ready, *steps]
        finished: list[tuple[_Prefill, BaseException | None]] = []
        pieces = self._prefill_pieces(prefills, [batch[k].session for k, _ in jobs],
                                      sum(len(p.new_ids) for _, p in jobs), shared, finished)
        if not jobs and not pieces:
            return results, finished
        sequences = [batch[k].session.sequence for k, _ in jobs] + [p.session.sequence for p, _ in pieces]
        new_ids = [p.new_ids for _, p in jobs] + [ids for _, ids in pieces]
        n_rows = [p.n_rows for _, p in jobs] + [0] * len(pieces)
        t0 = time.perf_counter()
        try:
            if self._torch_verify:
                rows, counts = self.model.forward_batch_rows(sequences, new_ids, n_rows)  # type: ignore[attr-defined]
            elif len(sequences) == 1:
                seq = sequences[0]
                assert seq is not None
                per_job = [seq.forward(new_ids[0], n_rows[0])]
            else:
                per_job = self.model.forward_batch(sequences, new_ids, n_rows)
        except Exception as exc:  # noqa: BLE001 - everything in this forward fails (INTERNAL)
            log.exception("forward of %d rounds and %d prefill pieces failed", len(jobs), len(pieces))
            for k, _ in jobs:
                results[k] = exc
            finished.extend((p, exc) for p, _ in pieces)
            return results, finished
        self._record(len(jobs), t0)
        if jobs:
            self.prefill_tokens_with_rounds += sum(len(ids) for _, ids in pieces)
            self.max_tokens_with_rounds = max(self.max_tokens_with_rounds, sum(map(len, new_ids)))
        for prefill, ids in pieces:
            prefill.session.absorb_prefill(ids)
            if not prefill.session.prefill_remaining:
                finished.append((prefill, None))
        if self._torch_verify:
            self._finish_torch(batch, ready, steps, rows, counts[: len(ready)], results)
            return results, finished
        for (k, prep), logits in zip(ready, per_job):
            try:
                results[k] = batch[k].session.finish_verify(prep, logits)
            except Exception as exc:  # noqa: BLE001
                results[k] = exc
        for (k, step), logits in zip(steps, per_job[len(ready):]):
            results[k] = self._finish_step(batch[k].session, step, logits[0])
        return results, finished

    def _prefill_pieces(self, prefills: list[_Prefill], in_forward: list[EdgeSession], round_tokens: int,
                        shared: bool, finished: list) -> list[tuple[_Prefill, list[int]]]:
        """The prompt ids each prefilling session feeds in this forward, within the
        token budget (`BatchConfig.prefill_tokens`), in arrival order."""
        room = self.config.prefill_tokens(round_tokens, shared)
        pieces: list[tuple[_Prefill, list[int]]] = []
        for prefill in prefills:
            if room <= 0:
                break
            if prefill.session in in_forward:  # cannot happen with request-reply clients
                continue
            try:
                ids = prefill.session.prefill_ids(room)
            except Exception as exc:  # noqa: BLE001 - this Start fails alone
                finished.append((prefill, exc))
                continue
            if not ids:  # nothing left (a prefix was reused meanwhile)
                finished.append((prefill, None))
                continue
            pieces.append((prefill, ids))
            room -= len(ids)
        return pieces

    @staticmethod
    def _finish_step(session: EdgeSession, step: PreparedStep, row: Any) -> Any:
        try:
            return session.finish_edge_only_step(step, row)
        except Exception as exc:  # noqa: BLE001 - a refused step fails alone
            return exc

    def _record(self, n_rounds: int, t0: float) -> None:
        # a forward of prefill pieces only is not a batch: the metrics count the forwards
        # that carried rounds or steps (with any prefill piece that rode in them)
        if self._metrics is not None and n_rounds:
            self._metrics.forward_seconds.observe(time.perf_counter() - t0)
            self._metrics.batch_size.observe(n_rounds)
        self.batches += 1
        self.rounds += n_rounds

    def _finish_torch(self, batch: list[_Job], ready: list[tuple[int, PreparedRound]],
                      steps: list[tuple[int, PreparedStep]], all_logits: Any, counts: list[int],
                      results: list[Any]) -> None:
        """The torch forward's kept rows (rounds' first, then one per step), verified on
        the logits' device (edge_service.torch_verify)."""
        from edge_service import torch_verify

        n_rows = sum(counts)
        if steps:  # one row each: the host's edge-only sampling reads it whole
            step_rows = all_logits[n_rows : n_rows + len(steps)].float().cpu().numpy()
            for (k, step), row in zip(steps, step_rows):
                results[k] = self._finish_step(batch[k].session, step, row)
        if not ready:
            return
        try:
            decided = torch_verify.verify_rounds([prep for _, prep in ready], all_logits[:n_rows], counts)
        except Exception as exc:  # noqa: BLE001 - a bug: every round fails, the caches stay true
            log.exception("verification of %d rounds failed", len(ready))
            decided = [exc] * len(ready)
        for (k, prep), decision in zip(ready, decided):
            session = batch[k].session
            if isinstance(decision, Exception):
                session.absorb_failed(prep)
                results[k] = decision
                continue
            try:
                results[k] = session.apply_verdict(prep, *decision)
            except Exception as exc:  # noqa: BLE001
                results[k] = exc
