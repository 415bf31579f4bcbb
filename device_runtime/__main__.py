"""`python -m device_runtime`: generate with a local draft model and a remote edge.

`python -m device_runtime serve ...` runs the OpenAI-compatible HTTP server instead.

Exit status: 0 when every token was verified by the target; 1 on an error (the edge
could not be reached or refused, the request was refused, the connection was lost);
2 on a usage error; 3 when the output contains tokens the target did not verify (only
possible with --fallback). Unverified text is written between UNVERIFIED_OPEN and
UNVERIFIED_CLOSE on stdout.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import ssl
import signal
import sys

from device_runtime.drafter import LlamaDrafter
from device_runtime import defaults
from device_runtime.session import DeviceClient, FailoverPolicy, GenerationConfig
from device_runtime.transport import EdgeError, parse_edge_urls
from protocol.downlink import DOWNLINKS
from protocol.modes import MODES
from protocol.sampling import SamplingParams
from protocol.wire import WireError

#: Exit statuses (documented in the module docstring, --help and the README).
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNVERIFIED = 0, 1, 2, 3
#: Brackets around text the target did not verify (fallback), in the stdout stream.
UNVERIFIED_OPEN, UNVERIFIED_CLOSE = "\u27e6", "\u27e7"
_EPILOG = (f"exit status: {EXIT_OK} all tokens verified by the target, {EXIT_ERROR} error, {EXIT_USAGE} usage, "
           f"{EXIT_UNVERIFIED} output contains unverified tokens (--fallback; written between "
           f"{UNVERIFIED_OPEN} and {UNVERIFIED_CLOSE})")


def ssl_context_for(ca_file: str | None) -> ssl.SSLContext | None:
    """The TLS context that trusts `ca_file` (None: the system's CAs)."""
    return ssl.create_default_context(cafile=ca_file) if ca_file else None


#: Where the device looks for an edge when no --edge is given.
DEFAULT_EDGE = "ws://127.0.0.1:8765"


def add_edge_arguments(p: argparse.ArgumentParser, *, edge_help: str) -> None:
    """--edge (repeatable, comma-separated), --session-key and --reconnect-attempts: the same
    for generating and for `serve`."""
    p.add_argument("--edge", action="append", default=None, metavar="URL",
                   help=f"{edge_help}; repeat it or separate URLs with commas to give replicas to move to "
                        f"when one is lost, busy or draining (default: {DEFAULT_EDGE})")
    p.add_argument("--session-key", default=None,
                   help="affinity key a load balancer hashes on (sent as ?dssd_key= and X-DSSD-Key; "
                        "default: random per run, kept across reconnections)")
    p.add_argument("--reconnect-attempts", type=int, default=FailoverPolicy.attempts,
                   help="reconnections in a row (with backoff) before a lost edge is an error")


def edge_urls_of(args: argparse.Namespace) -> tuple[str, ...]:
    """The edge URLs given (the default one without --edge)."""
    return parse_edge_urls(args.edge if args.edge is not None else [DEFAULT_EDGE])


def _gamma_arg(value: str) -> int | None:
    try:
        return defaults.parse_gamma(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    from dssd_common.models import default_models

    p = argparse.ArgumentParser(
        prog="python -m device_runtime",
        description="Device half of DSSD: draft with a GGUF model, verify on the edge.",
        epilog=_EPILOG,
    )
    add_edge_arguments(p, edge_help="edge URL (ws://HOST:PORT), or a load balancer in front of replicas")
    p.add_argument("--model", default=None,
                   help=f"draft GGUF (default: {default_models().draft_q4_0_gguf})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", default="The three primary colors are", help="plain text prompt")
    g.add_argument("--chat", help="a user message, formatted with the GGUF's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--mode", choices=MODES, default=defaults.MODE)
    p.add_argument("--max-new-tokens", "-n", type=int, default=defaults.MAX_NEW_TOKENS)
    p.add_argument("--gamma", default="auto", type=_gamma_arg,
                   help="draft tokens per round: 'auto' (adaptive, up to --max-gamma) or a number")
    p.add_argument("--max-gamma", type=int, default=defaults.MAX_GAMMA, help="upper bound for --gamma auto")
    p.add_argument("--no-pipeline", action="store_true",
                   help="do not draft ahead while a verdict is in flight")
    p.add_argument("--temperature", "-t", type=float, default=defaults.TEMPERATURE, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=defaults.TOP_K, help="0 disables")
    p.add_argument("--top-p", type=float, default=defaults.TOP_P, help="1 disables")
    p.add_argument("--seed", type=int, default=defaults.SEED)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--downlink", choices=DOWNLINKS, default=defaults.DOWNLINK,
                   help="how P_j comes down after a rejection in dssd (all exact)")
    p.add_argument("--fallback", action="store_true",
                   help="when an edge that accepted this request is lost mid-generation, continue with the "
                        "draft alone (marked unverified, exit status 3) instead of failing")
    p.add_argument("--round-timeout", type=float, default=30.0, help="seconds to wait for a verdict")
    p.add_argument("--token", default=os.environ.get("DSSD_EDGE_TOKEN", ""),
                   help="access token for the edge (default: $DSSD_EDGE_TOKEN)")
    p.add_argument("--ca-file", default=None, help="CA certificate (PEM) to trust for a wss:// edge")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    p.add_argument("--n-gpu-layers", type=int, default=0,
                   help="draft layers to offload to a GPU (Jetson; -1 = all) when llama.cpp has GPU support")
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--json", action="store_true", help="print the stats as JSON instead of a summary")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


async def _run(args: argparse.Namespace) -> int:
    from dssd_common.models import default_models

    drafter = LlamaDrafter(args.model or default_models().draft_q4_0_gguf,
                           n_ctx=args.n_ctx, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                           max_gamma=max(args.max_gamma, args.gamma or 1))
    if args.chat is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.chat})
        prompt_ids = drafter.tokenize(drafter.chat_prompt(messages), add_bos=False)
    else:
        prompt_ids = drafter.tokenize(args.prompt)
    config = GenerationConfig(
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingParams(args.temperature, args.top_k, args.top_p),
        gamma=args.gamma,
        max_gamma=args.max_gamma,
        pipeline=not args.no_pipeline,
        seed=args.seed,
        stop=tuple(args.stop),
        downlink=args.downlink,
        fallback=args.fallback,
        round_timeout_s=args.round_timeout,
    )
    client = DeviceClient(drafter, None if args.mode == "device-only" else edge_urls_of(args),
                          auth_token=args.token, ssl_context=ssl_context_for(args.ca_file),
                          session_key=args.session_key, failover=FailoverPolicy(attempts=args.reconnect_attempts))
    in_unverified = False

    def show(ids: list[int], text: str, verified: bool, logprobs: object = None) -> None:
        nonlocal in_unverified
        if args.json:
            return
        if verified == in_unverified:  # entering or leaving a run of unverified text
            sys.stdout.write(UNVERIFIED_CLOSE if in_unverified else UNVERIFIED_OPEN)
            in_unverified = not verified
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        if args.mode != "device-only":
            await client.connect(retry=True)  # a misconfigured edge fails here, before any output
        if args.chat is None and not args.json:
            sys.stdout.write(args.prompt)
        result = await client.generate(prompt_ids, config, on_tokens=show)
    finally:
        await client.close()
        drafter.close()
    if args.json:
        doc = {"text": result.text, "ids": result.ids, "verified": result.verified, "exact": result.exact,
               "finish_reason": result.finish_reason, "stats": result.stats.as_dict()}
        print(json.dumps(doc, indent=2))
    else:
        if in_unverified:
            sys.stdout.write(UNVERIFIED_CLOSE)
        sys.stdout.write("\n")
        print(f"[{result.finish_reason}] " + result.stats.summary(), file=sys.stderr)
    if not result.exact:
        print(f"warning: {result.stats.unverified_tokens} of {len(result.ids)} tokens were NOT verified by "
              f"the target (draft alone while the edge was lost); exit status {EXIT_UNVERIFIED}", file=sys.stderr)
        return EXIT_UNVERIFIED
    return EXIT_OK


def build_serve_parser() -> argparse.ArgumentParser:
    from dssd_common.models import default_models

    p = argparse.ArgumentParser(
        prog="python -m device_runtime serve",
        description="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models) "
        "over the device runtime. See docs/device-api.md.",
    )
    add_edge_arguments(p, edge_help="edge URL (ws://HOST:PORT), or a load balancer in front of replicas; an "
                                    "empty string allows only mode device-only")
    p.add_argument("--model", default=None,
                   help=f"draft GGUF (default: {default_models().draft_q4_0_gguf})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--model-name", default=None,
                   help="model id served at /v1/models (default: the GGUF file name without .gguf)")
    p.add_argument("--parallel", type=int, default=1,
                   help="requests generated at once; each loads its own llama.cpp context (default 1: "
                   "requests queue)")
    p.add_argument("--max-queue", type=int, default=64, help="queued requests before answering 429")
    p.add_argument("--max-gamma", type=int, default=16, help="largest gamma a request may ask for")
    p.add_argument("--token", default=os.environ.get("DSSD_EDGE_TOKEN", ""),
                   help="access token for the edge (default: $DSSD_EDGE_TOKEN)")
    p.add_argument("--ca-file", default=None, help="CA certificate (PEM) to trust for a wss:// edge")
    p.add_argument("--fallback", action="store_true",
                   help="when the edge is lost mid-generation, continue with the draft alone; such chunks "
                        "carry dssd.verified = false")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    p.add_argument("--n-gpu-layers", type=int, default=0,
                   help="draft layers to offload to a GPU (Jetson; -1 = all) when llama.cpp has GPU support")
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def serve_main(argv: list[str]) -> int:
    from device_runtime.api import DeviceRuntime
    from device_runtime.openai_server import serve_forever
    from dssd_common.models import default_models

    args = build_serve_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        rt = DeviceRuntime(args.model or default_models().draft_q4_0_gguf, edge_urls_of(args) or None,
                           n_ctx=args.n_ctx, n_threads=args.threads, max_gamma=args.max_gamma,
                           n_gpu_layers=args.n_gpu_layers, parallel=args.parallel, max_queue=args.max_queue,
                           model_name=args.model_name, auth_token=args.token, ca_file=args.ca_file,
                           fallback=args.fallback, session_key=args.session_key,
                           failover=FailoverPolicy(attempts=args.reconnect_attempts))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    def ready(server, port: int) -> None:  # noqa: ANN001
        print(f"ready: http://{args.host}:{port}/v1 (model {server.model_name!r}, edge {rt.edge_url or 'none'})",
              flush=True)

    def _terminate(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        asyncio.run(serve_forever(rt, host=args.host, port=args.port, model_name=args.model_name, ready=ready))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        rt.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "serve":
        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return asyncio.run(_run(args))
    except (EdgeError, ConnectionError, OSError, ValueError, WireError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
