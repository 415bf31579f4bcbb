"""`python -m edge_service`: serve a target model to devices over WebSocket."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys

from edge_service.scheduler import BatchConfig
from edge_service.server import EdgeServer, ServerConfig
from edge_service.session import EdgeLimits


def build_parser() -> argparse.ArgumentParser:
    from dssd_common.models import default_models

    p = argparse.ArgumentParser(
        prog="python -m edge_service",
        description="Edge half of DSSD: verify drafts from devices with the target model.",
    )
    p.add_argument("--model", default=None,
                   help="target: an HF model directory or a .gguf file "
                        f"(default: {default_models().target_gguf})")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch", help="target runtime")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to accept remote devices)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--max-sessions", type=int, default=64)
    p.add_argument("--max-gamma", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=2048)
    p.add_argument("--max-context", type=int, default=None, help="cap below the model's context")
    p.add_argument("--token", action="append", default=[],
                   help="access token a device must present (repeatable; also $DSSD_EDGE_TOKENS, "
                        "comma-separated). Without one, keep the default loopback bind")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve wss://")
    p.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    p.add_argument("--handshake-timeout", type=float, default=5.0,
                   help="seconds a new connection has to send an acceptable Hello")
    p.add_argument("--max-unauthenticated", type=int, default=64,
                   help="connections held before their Hello is accepted; one more closes the oldest")
    p.add_argument("--idle-timeout", type=float, default=300.0, help="seconds without a frame")
    p.add_argument("--work-rate", type=float, default=100_000.0,
                   help="model tokens (prefilled + verified) per second per session before its next job "
                        "is delayed (never refused); 0 = unlimited")
    p.add_argument("--batch-window-ms", type=float, default=3.0,
                   help="longest a draft waits for other sessions' drafts to verify them in one batch")
    p.add_argument("--max-batch", type=int, default=16, help="most rounds verified in one batched forward")
    p.add_argument("--no-batching", action="store_true", help="verify every round on its own")
    p.add_argument("--kv-budget-mb", type=float, default=None,
                   help="KV cache memory all sessions may reserve together (torch backend); a Start that "
                        "does not fit after evicting idle sessions' caches is refused with LIMIT "
                        "(default: no budget)")
    p.add_argument("--prefill-chunk", type=int, default=BatchConfig.prefill_chunk,
                   help="most prompt tokens one forward prefills; prompts are prefilled in pieces "
                        "inside the verification batches (0: a whole prompt in one forward)")
    p.add_argument("--token-budget", type=int, default=BatchConfig.token_budget,
                   help="most tokens in one forward while other sessions are connected: a prompt's "
                        "prefill piece fills what the batch's rounds leave, so a long prompt delays "
                        "the others' rounds by little (0: no budget, pieces of --prefill-chunk)")
    p.add_argument("--no-batch-edge-only", action="store_true",
                   help="run edge-only decode steps one forward each instead of in the batches")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)")
    p.add_argument("--replica-id", default="",
                   help="this replica's name in Welcomes, /health and logs (default: HOSTNAME:PORT)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT: seconds to finish in-flight rounds and send devices to other "
                        "replicas before exiting (a second signal exits at once)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


async def _serve(args: argparse.Namespace) -> None:
    from edge_service.backends.torch_backend import TorchTargetModel
    from dssd_common.models import default_models

    model_path = args.model or default_models().target_gguf
    if args.backend == "onnx" and args.kv_budget_mb is not None:
        raise ValueError("--kv-budget-mb needs the torch backend (ONNX Runtime manages its own cache)")
    if args.backend == "onnx":  # an edge-export directory; CUDA when --device is cuda
        from edge_service.backends.onnx_backend import OnnxTargetModel

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.device.startswith("cuda") else None
        model = OnnxTargetModel(model_path, providers=providers, threads=args.threads)
    else:
        model = TorchTargetModel(model_path, dtype=args.dtype, device=args.device, threads=args.threads,
                                 kv_budget_mb=args.kv_budget_mb)
    limits = EdgeLimits(max_gamma=args.max_gamma, max_new_tokens=args.max_new_tokens,
                        max_context=args.max_context)
    tokens = set(args.token) | {t for t in os.environ.get("DSSD_EDGE_TOKENS", "").split(",") if t}
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    config = ServerConfig(
        host=args.host, port=args.port, max_sessions=args.max_sessions, limits=limits,
        auth_tokens=frozenset(tokens), tls_cert=args.tls_cert, tls_key=args.tls_key,
        handshake_timeout_s=args.handshake_timeout, idle_timeout_s=args.idle_timeout,
        max_unauthenticated=args.max_unauthenticated, work_tokens_per_s=args.work_rate,
        batching=BatchConfig(enabled=not args.no_batching, window_ms=args.batch_window_ms,
                             max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                             token_budget=args.token_budget,
                             batch_edge_only=not args.no_batch_edge_only),
        metrics_port=args.metrics_port, replica_id=args.replica_id,
    )
    server = EdgeServer(model, config)
    port = await server.start()
    print(f"edge_service ready on {server.scheme}://{args.host}:{port} serving {model.name} "
          f"as replica {server.replica_id} (health: http{'s' if args.tls_cert else ''}://{args.host}:{port}/health)", flush=True)
    signals = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    log = logging.getLogger(__name__)
    await signals.get()
    log.info("draining (%.0f s at most; Ctrl-C again to exit now)", args.drain_timeout)
    drain = asyncio.ensure_future(server.drain(args.drain_timeout))
    while not drain.done():  # a second SIGTERM (Kubernetes after a preStop drain) changes nothing
        again = asyncio.ensure_future(signals.get())
        await asyncio.wait({drain, again}, return_when=asyncio.FIRST_COMPLETED)
        if again.done() and again.result() == signal.SIGINT:
            break
        again.cancel()
    if drain.done():
        log.info("drained: %s", json.dumps(dataclasses.asdict(drain.result()), sort_keys=True))
    else:
        drain.cancel()
    log.info("shutting down")
    await server.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        asyncio.run(_serve(args))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
