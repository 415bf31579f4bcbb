"""Bytes on the wire per generated token: dssd vs the paper's dssd vs dsd, both directions.

`python -m benchmarks.bytes_per_token` runs the default pair (Q4_0 draft, fp32 target)
with gamma 4 over 8 prompts x 128 new tokens at T = 1.0 and at T = 0.7 with top-k 40,
and prints bytes up / down / total per generated token (protocol frames, 16-byte headers
included; WebSocket framing excluded) per mode. Byte counts do not depend on timing, so
this runs on loopback without a link emulator.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from device_runtime.drafter import LlamaDrafter
from device_runtime.session import DeviceClient, GenerationConfig
from dssd_common.models import default_models
from edge_service.backends.torch_backend import TorchTargetModel
from edge_service.server import EdgeServerThread, ServerConfig
from protocol.modes import SPECULATIVE_MODES
from protocol.sampling import SamplingParams

PROMPTS = (
    "Explain why the sky is blue.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of the French Revolution?",
    "Give me three tips for learning a new language.",
    "Describe how a bicycle works.",
    "Summarize the plot of Romeo and Juliet.",
    "Why do cats purr?",
    "Write a haiku about autumn rain.",
)
SETTINGS = {"T=1.0": SamplingParams(1.0, 0, 1.0), "T=0.7,top-k=40": SamplingParams(0.7, 40, 1.0)}


@dataclass
class Row:
    setting: str
    mode: str
    tokens: int
    bytes_up: int
    bytes_down: int

    @property
    def per_token(self) -> tuple[float, float, float]:
        t = max(self.tokens, 1)
        return self.bytes_up / t, self.bytes_down / t, (self.bytes_up + self.bytes_down) / t


async def measure(client: DeviceClient, prompts: list[list[int]], tokens: int, gamma: int) -> list[Row]:
    rows = []
    with tqdm(total=len(SETTINGS) * len(SPECULATIVE_MODES) * len(prompts), file=sys.stderr, desc="generations") as bar:
        for setting, params in SETTINGS.items():
            for mode in SPECULATIVE_MODES:  # the modes whose bytes per token differ
                row = Row(setting, mode, 0, 0, 0)
                for seed, ids in enumerate(prompts):
                    cfg = GenerationConfig(mode=mode, max_new_tokens=tokens, sampling=params, gamma=gamma,
                                           seed=seed, pipeline=False)
                    res = await client.generate(ids, cfg)
                    row.tokens += res.stats.tokens
                    row.bytes_up += res.stats.bytes_up
                    row.bytes_down += res.stats.bytes_down
                    bar.update()
                rows.append(row)
    await client.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bytes_per_token", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the 8 built-in prompts")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per generation")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--draft", default=None, help="draft GGUF (default: the Q4_0 default draft)")
    p.add_argument("--csv", type=Path, default=None, help="also write the table as CSV")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    models = default_models()
    drafter = LlamaDrafter(args.draft or models.draft_q4_0_gguf, n_ctx=1024, n_threads=1)
    target = TorchTargetModel(models.target_gguf, threads=1)
    prompts = [drafter.tokenize(drafter.chat_prompt([{"role": "user", "content": q}]), add_bos=False)
               for q in PROMPTS[: args.prompts]]
    with EdgeServerThread(target, ServerConfig(port=0)) as edge:
        rows = asyncio.run(measure(DeviceClient(drafter, edge.url), prompts, args.tokens, args.gamma))
    print(f"{'setting':<16}{'mode':<12}{'tokens':>8}{'up B/tok':>11}{'down B/tok':>12}{'total B/tok':>13}")
    for r in rows:
        up, down, total = r.per_token
        print(f"{r.setting:<16}{r.mode:<12}{r.tokens:>8}{up:>11.1f}{down:>12.1f}{total:>13.1f}")
    if args.csv:
        with args.csv.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["setting", "mode", "tokens", "bytes_up", "bytes_down", "bytes_per_token"])
            for r in rows:
                w.writerow([r.setting, r.mode, r.tokens, r.bytes_up, r.bytes_down, round(r.per_token[2], 2)])
    drafter.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
