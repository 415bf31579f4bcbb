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
`batch_edge_only` is off. A `Start` (`start`) runs as separate worker jobs: validation
and the KV reservation, then one job per `prefill_chunk` prompt tokens, then the
request's setup; batches queued while a chunk runs go before the next chunk, so a long
prompt delays the other sessions by at most one chunk.

Fairness: each session has at most one round or step in flight (the protocol is
request-reply), batches are taken first-in first-out, so a round waits for at most
ceil(sessions / max_batch) batches plus the one running and one prefill chunk. `More`
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
from edge_service.session import EdgeSession, PreparedRound, PreparedStep, ProtocolError
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
    #: prompt tokens per prefill job on the worker; other sessions' batches run between
    #: jobs, so a long prompt delays them by at most one chunk. 0: a Start's whole
    #: prefill is one job (the unchunked baseline)
    prefill_chunk: int = 256
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

    @property
    def effective_max_batch(self) -> int:
        return self.max_batch if self.enabled else 1


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
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self._free_since = 0.0  # when the previous batch finished
        self._prefilling = 0  # sessions inside a chunked Start (they cannot join a batch)
        self.batches = 0  # forwards run (for tests and logs)
        self.rounds = 0
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
        """A Start, its prompt prefilled in jobs of `prefill_chunk` tokens on the worker.

        Each chunk is its own worker job, so batches queued while a chunk runs go before
        the next chunk: the head-of-line delay a long prompt causes the other sessions
        is one chunk, not the whole prompt.
        """
        chunk = self.config.prefill_chunk
        if not chunk:
            return await self._run(session.start, msg)
        self._prefilling += 1
        try:
            await self._run(session.begin_start, msg)
            while await self._run(session.prefill_step, chunk):
                pass
            return await self._run(session.finish_start)
        finally:
            self._prefilling -= 1

    async def _enqueue(self, session: EdgeSession, msg: wire.Draft | None) -> Any:
        if self._closed:
            raise ProtocolError(ErrorCode.SHUTDOWN, "the edge is shutting down")
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._dispatch_loop(), name="verify-scheduler")
        job = _Job(session, msg, loop.create_future(), time.perf_counter())
        self._queue.append(job)
        assert self._wake is not None
        self._wake.set()
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
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(ProtocolError(ErrorCode.SHUTDOWN, "the edge is shutting down"))

    # -- dispatcher (event loop) --------------------------------------------------------

    def _full(self) -> bool:
        n = len(self._queue)
        if n >= self.config.effective_max_batch:
            return True
        return self._active is not None and n >= self._active() - self._prefilling

    async def _dispatch_loop(self) -> None:
        assert self._wake is not None
        window = self.config.window_ms / 1000.0 if self.config.enabled else 0.0
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            while not self._full():
                remaining = max(self._queue[0].t_arrival, self._free_since) + window - time.perf_counter()
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
            if not batch:
                continue
            try:
                results = await self._run(self._execute, batch)
            except asyncio.CancelledError:
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(ProtocolError(ErrorCode.SHUTDOWN, "the edge is shutting down"))
                raise
            except BaseException as exc:  # noqa: BLE001 - each waiter gets the failure
                results = [exc] * len(batch)
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

    # -- one batch (model worker thread) ---------------------------------------------

    def _execute(self, batch: list[_Job]) -> list[Any]:
        """Prepare, forward together, finish; one result (reply or exception) per job.

        Verification rounds come first in the forward, edge-only steps after them, so
        the rounds' logits rows are one contiguous block.
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
        jobs = ready + steps
        if not jobs:
            return results
        sequences = [batch[k].session.sequence for k, _ in jobs]
        if self._torch_verify:
            return self._execute_torch(batch, ready, steps, sequences, results)
        t0 = time.perf_counter()
        try:
            if len(jobs) == 1:
                seq = sequences[0]
                assert seq is not None
                all_logits = [seq.forward(jobs[0][1].new_ids, jobs[0][1].n_rows)]
            else:
                all_logits = self.model.forward_batch(
                    sequences, [prep.new_ids for _, prep in jobs], [prep.n_rows for _, prep in jobs]
                )
        except Exception as exc:  # noqa: BLE001 - every round of this forward fails (INTERNAL)
            return _fail_forward(jobs, results, exc)
        self._record(len(jobs), t0)
        for (k, prep), logits in zip(ready, all_logits):
            try:
                results[k] = batch[k].session.finish_verify(prep, logits)
            except Exception as exc:  # noqa: BLE001
                results[k] = exc
        for (k, step), logits in zip(steps, all_logits[len(ready):]):
            results[k] = self._finish_step(batch[k].session, step, logits[0])
        return results

    @staticmethod
    def _finish_step(session: EdgeSession, step: PreparedStep, row: Any) -> Any:
        try:
            return session.finish_edge_only_step(step, row)
        except Exception as exc:  # noqa: BLE001 - a refused step fails alone
            return exc

    def _record(self, n_rounds: int, t0: float) -> None:
        if self._metrics is not None:
            self._metrics.forward_seconds.observe(time.perf_counter() - t0)
            self._metrics.batch_size.observe(n_rounds)
        self.batches += 1
        self.rounds += n_rounds

    def _execute_torch(self, batch: list[_Job], ready: list[tuple[int, PreparedRound]],
                       steps: list[tuple[int, PreparedStep]], sequences: list, results: list[Any]) -> list[Any]:
        """`_execute` with the logits left on the model's device and verified there."""
        from edge_service import torch_verify

        preps = [prep for _, prep in ready]
        jobs = ready + steps
        t0 = time.perf_counter()
        try:
            all_logits, all_counts = self.model.forward_batch_rows(  # type: ignore[attr-defined]
                sequences, [p.new_ids for _, p in jobs], [p.n_rows for _, p in jobs])
        except Exception as exc:  # noqa: BLE001 - every round of this forward fails (INTERNAL)
            return _fail_forward(jobs, results, exc)
        self._record(len(jobs), t0)
        counts = all_counts[: len(ready)]
        n_rows = sum(counts)
        logits = all_logits[:n_rows]
        if steps:  # one row each: the host's edge-only sampling reads it whole
            step_rows = all_logits[n_rows:].float().cpu().numpy()
            for (k, step), row in zip(steps, step_rows):
                results[k] = self._finish_step(batch[k].session, step, row)
        if not ready:
            return results
        try:
            decided = torch_verify.verify_rounds(preps, logits, counts)
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
        return results


def _fail_forward(ready: list[tuple[int, Any]], results: list[Any], exc: Exception) -> list[Any]:
    """A batched forward failed: every round it carried gets the failure (INTERNAL)."""
    log.exception("verification forward of %d rounds failed", len(ready), exc_info=exc)
    for k, _ in ready:
        results[k] = exc
    return results
