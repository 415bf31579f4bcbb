"""Soak: many concurrent device sessions against one edge process for minutes.

`python -m benchmarks.soak --sessions 16 --duration 120` starts `python -m edge_service`
on the default pair, runs N real device clients (llama.cpp drafters, greedy dssd, gamma
auto) in a loop over a few prompts until the duration is spent, checks every output
against the edge's own greedy decoding of the same prompt (edge-only mode, the target
alone), and reports requests, failures, wrong outputs and the edge's RSS at start and end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import psutil

from device_runtime.drafter import LlamaDrafter
from device_runtime.session import DeviceClient, GenerationConfig
from dssd_common.models import default_models
from protocol.sampling import SamplingParams

PROMPTS = ("Why is the sky blue?", "Name three rivers.", "What is a prime number?", "Say hello in French.")
GREEDY = SamplingParams(0.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def soak(url: str, drafters: list[LlamaDrafter], prompts: list[list[int]], tokens: int,
               duration: float, edge: psutil.Process) -> dict:
    ref_client = DeviceClient(drafters[0], url)
    refs = [(await ref_client.generate(p, GenerationConfig(mode="edge-only", max_new_tokens=tokens,
                                                           sampling=GREEDY))).ids for p in prompts]
    await ref_client.close()
    counts = {"requests": 0, "failed": 0, "wrong": 0, "tokens": 0}
    deadline = time.monotonic() + duration
    rss_mb: list[float] = []

    async def sample_rss() -> None:  # every 5 s; the first quarter is warm-up (caches, arenas)
        while time.monotonic() < deadline:
            rss_mb.append(edge.memory_info().rss / 2**20)
            await asyncio.sleep(5)

    async def device(i: int, drafter: LlamaDrafter) -> None:
        client = DeviceClient(drafter, url, client_name=f"soak-{i}")
        k = i
        while time.monotonic() < deadline:
            p = k % len(prompts)
            k += 1
            try:
                res = await client.generate(prompts[p], GenerationConfig(
                    mode="dssd", max_new_tokens=tokens, sampling=GREEDY, fallback=False))
                counts["requests"] += 1
                counts["tokens"] += len(res.ids)
                counts["wrong"] += res.ids != refs[p]
            except Exception as exc:  # noqa: BLE001 - counted and reported
                counts["failed"] += 1
                print(f"session {i}: {type(exc).__name__}: {exc}", file=sys.stderr)
                await client.close()
            await asyncio.sleep(0)
        await client.close()

    await asyncio.gather(sample_rss(), *(device(i, d) for i, d in enumerate(drafters)))
    rss_mb.append(edge.memory_info().rss / 2**20)
    warm = rss_mb[len(rss_mb) // 4]
    counts.update(edge_rss_after_warmup_mb=round(warm, 1), edge_rss_end_mb=round(rss_mb[-1], 1),
                  edge_rss_max_mb=round(max(rss_mb), 1))
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args(argv)
    models = default_models()
    port = _free_port()
    edge = subprocess.Popen([sys.executable, "-m", "edge_service", "--port", str(port), "--threads", "1",
                             "--max-sessions", str(args.sessions + 4)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert "ready" in edge.stdout.readline()
        proc = psutil.Process(edge.pid)
        drafters = [LlamaDrafter(models.draft_q4_0_gguf, n_ctx=512, n_threads=1) for _ in range(args.sessions)]
        prompts = [drafters[0].tokenize(drafters[0].chat_prompt([{"role": "user", "content": q}]), add_bos=False)
                   for q in PROMPTS]
        rss_start = proc.memory_info().rss
        t0 = time.monotonic()
        counts = asyncio.run(soak(f"ws://127.0.0.1:{port}", drafters, prompts, args.tokens, args.duration, proc))
        elapsed = time.monotonic() - t0
        result = {**counts, "sessions": args.sessions, "seconds": round(elapsed, 1),
                  "edge_rss_idle_mb": round(rss_start / 2**20, 1)}
        print(json.dumps(result))
        return 0 if counts["failed"] == 0 and counts["wrong"] == 0 else 1
    finally:
        edge.terminate()
        edge.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
