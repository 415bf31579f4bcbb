"""`make cluster-demo`: edge replicas behind HAProxy on loopback, several devices, one replica killed.

Starts N `python -m edge_service` processes behind HAProxy (deploy/haproxy.cfg), connects
several devices through it (each with its own affinity key), prints which replica serves
whom, kills the replica serving the most devices while they generate (unless --no-kill),
and prints where each request finished, its reconnections and whether every token was
verified. Tables go to stdout, logs to stderr.

    python scripts/cluster_demo.py [--tiny] [--devices 6] [--tokens 48] [--no-kill] [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_runtime.drafter import LlamaDrafter  # noqa: E402
from device_runtime.session import DeviceClient, FailoverPolicy, GenerationConfig  # noqa: E402
from dssd_common.cluster import LoopbackCluster  # noqa: E402
from dssd_common.models import default_models  # noqa: E402
from protocol.sampling import SamplingParams  # noqa: E402

PROMPTS = ["The three primary colors are", "Water boils at", "The capital of France is",
           "A haiku about the sea:", "The first law of motion says", "My favourite number is",
           "Once upon a time", "The best way to learn is"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python scripts/cluster_demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=3, help="edge processes behind HAProxy")
    p.add_argument("--devices", type=int, default=6, help="devices generating at once")
    p.add_argument("--tokens", type=int, default=48, help="new tokens per device")
    p.add_argument("--tiny", action="store_true", help="tiny random models (fast; built in a temp dir)")
    p.add_argument("--no-kill", action="store_true", help="do not kill a replica")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout instead of tables")
    return p


async def _run(args: argparse.Namespace, cluster: LoopbackCluster, drafters: list[LlamaDrafter]) -> dict:
    clients = [DeviceClient(d, cluster.url, failover=FailoverPolicy(attempts=8, backoff_s=0.1)) for d in drafters]
    first = [(await c.connect()).welcome.replica for c in clients]
    victim = None if args.no_kill else Counter(first).most_common(1)[0][0]
    if not args.json:
        print(f"balancer {cluster.url}; replicas {', '.join(r.replica_id for r in cluster.replicas)}")
        for i, (c, rep) in enumerate(zip(clients, first)):
            print(f"  device {i} (key {c.session_key[:8]}...) -> {rep}")
        if victim:
            print(f"killing {victim} (SIGKILL) once one of its devices has 8 tokens")
    t_kill: list[float] = []

    def on_tokens(i: int):  # noqa: ANN202
        count = [0]

        def cb(ids: list[int], text: str, verified: bool) -> None:
            count[0] += len(ids)
            if victim and not t_kill and first[i] == victim and count[0] >= 8:
                t_kill.append(time.perf_counter())
                cluster.kill(victim)
        return cb

    config = GenerationConfig(sampling=SamplingParams(0.0), max_new_tokens=args.tokens)
    try:
        results = await asyncio.gather(*(c.generate(d.tokenize(PROMPTS[i % len(PROMPTS)]), config, on_tokens(i))
                                         for i, (c, d) in enumerate(zip(clients, drafters))))
    finally:
        for c in clients:
            await c.close()
    return {
        "balancer": cluster.url,
        "killed": victim,
        "sessions_per_replica": dict(Counter(first)),
        "devices": [{"device": i, "prompt": PROMPTS[i % len(PROMPTS)], "replicas": r.stats.replicas,
                     "reconnects": r.stats.reconnects, "tokens": len(r.ids), "exact": r.exact,
                     "text": r.text} for i, r in enumerate(results)],
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="dssd-cluster-") as tmp:
        if args.tiny:
            from quantize.tiny import build_tiny_pair

            pair = build_tiny_pair(Path(tmp) / "tiny")
            target, draft = pair.target_gguf, pair.draft_gguf
        else:
            models = default_models()
            target, draft = models.target_gguf, models.draft_q4_0_gguf
        print(f"starting {args.replicas} edge replicas of {Path(target).name} behind HAProxy ...", file=sys.stderr)
        with LoopbackCluster(str(target), Path(tmp) / "run", n=args.replicas) as cluster:
            drafters = [LlamaDrafter(draft, n_ctx=512, n_threads=1) for _ in range(args.devices)]
            try:
                doc = asyncio.run(_run(args, cluster, drafters))
            finally:
                for d in drafters:
                    d.close()
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print("\nwho served whom:")
        for d in doc["devices"]:
            path = " -> ".join(d["replicas"])
            print(f"  device {d['device']}: {path:<24} reconnects {d['reconnects']}  {d['tokens']} tokens  "
                  f"{'all verified' if d['exact'] else 'NOT ALL VERIFIED'}  {d['text'][:40]!r}")
    return 0 if all(d["exact"] for d in doc["devices"]) else 1


if __name__ == "__main__":
    sys.exit(main())
