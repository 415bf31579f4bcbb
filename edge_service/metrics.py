"""The edge's Prometheus metrics: one `CollectorRegistry` per server, served on /metrics.

Speculative-decoding counters use vLLM's names (`spec_decode_num_drafts`, ...; the
client library appends `_total` to counters), so dashboards built for vLLM read them.
Everything else is prefixed `dssd_`. Nothing here touches prometheus-client's global
registry: several edges in one process (tests, benchmarks) keep separate counts.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from protocol import wire
from protocol.wire import ErrorCode

log = logging.getLogger(__name__)

#: Content type of the text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _error_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)


class EdgeMetrics:
    """Counters, gauges and histograms of one edge server."""

    def __init__(self, active_sessions: Callable[[], float] | None = None) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.sessions_active = Gauge("dssd_sessions_active", "Device sessions currently connected", registry=r)
        if active_sessions is not None:
            self.sessions_active.set_function(active_sessions)
        self.requests = Counter("dssd_requests", "Generation requests started, by mode", ["mode"], registry=r)
        self.num_drafts = Counter(
            "spec_decode_num_drafts", "Verification rounds (one draft each)", registry=r
        )
        self.num_draft_tokens = Counter(
            "spec_decode_num_draft_tokens", "Draft tokens received for verification", registry=r
        )
        self.num_accepted_tokens = Counter(
            "spec_decode_num_accepted_tokens", "Draft tokens accepted by the target", registry=r
        )
        self.accepted_per_pos = Counter(
            "spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at each draft position (0-based)",
            ["position"],
            registry=r,
        )
        self.drafted_per_pos = Counter(
            "spec_decode_num_draft_tokens_per_pos",
            "Draft tokens received at each draft position (0-based)",
            ["position"],
            registry=r,
        )
        self.batch_size = Histogram(
            "dssd_verify_batch_size",
            "Members of one batched target forward: verification rounds and edge-only decode steps",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.verify_latency = Histogram(
            "dssd_verify_latency_seconds",
            "Draft received to verdict ready: queueing, batch window, forward and verification",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.forward_seconds = Histogram(
            "dssd_batch_forward_seconds",
            "Duration of one batched target forward carrying rounds or steps (and any prefill piece in it)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.bytes_in = Counter("dssd_bytes_received", "WebSocket payload bytes received from devices", registry=r)
        self.bytes_out = Counter("dssd_bytes_sent", "WebSocket payload bytes sent to devices", registry=r)
        self.errors = Counter("dssd_errors", "Error frames sent to devices, by code", ["code"], registry=r)
        for code in ErrorCode:  # every code shows up, at 0, from the first scrape
            self.errors.labels(code=code.name)
        self._http: tuple[object, threading.Thread] | None = None

    # -- recording --------------------------------------------------------------------

    def observe(self, message: wire.Message, replies: Sequence[wire.Message]) -> None:
        """Count one handled device message and the edge's replies to it."""
        if isinstance(message, wire.Start):
            self.requests.labels(mode=message.mode).inc()
        elif isinstance(message, wire.Draft):
            for reply in replies:
                if isinstance(reply, wire.VerdictMsg):
                    self.record_round(int(message.draft_ids.size), int(reply.n_accepted))

    def record_round(self, gamma: int, n_accepted: int) -> None:
        self.num_drafts.inc()
        self.num_draft_tokens.inc(gamma)
        self.num_accepted_tokens.inc(n_accepted)
        for i in range(gamma):
            self.drafted_per_pos.labels(position=str(i)).inc()
            if i < n_accepted:
                self.accepted_per_pos.labels(position=str(i)).inc()

    def error(self, code: int) -> None:
        self.errors.labels(code=_error_name(code)).inc()

    # -- exposition -------------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in the Prometheus text format (what /metrics serves)."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics over HTTP in a daemon thread; returns the bound port (port 0: any)."""
        if self._http is not None:
            raise RuntimeError("metrics are already served")
        httpd, thread = start_http_server(port, host, registry=self.registry)
        self._http = (httpd, thread)
        bound = int(httpd.server_port)
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            httpd, thread = self._http
            httpd.shutdown()  # type: ignore[attr-defined]
            httpd.server_close()  # type: ignore[attr-defined]
            thread.join(timeout=10)
            self._http = None
