"""`python -m benchmarks structured`: JSON-schema output vs free text on the same prompts.

Structured output is exact constrained decoding split across device and edge: both mask
their logits with the same grammar (protocol/constraints.py). Most of a JSON document's
tokens are forced (keys, punctuation), so drafts should pass more often than in free text;
this measures it. Per prompt and run, back to back on one device client and one edge
(in-process, one torch thread), alternating the order: the same request as free text and
with a JSON schema, same sampling, same fixed gamma (no pipelining, which constrained
requests do not use, so the comparison is like for like). Reports acceptance rate, mean
accepted length and tokens/s, medians over prompts x runs, and the paired ratio
structured / free of tokens/s.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from protocol.constraints import json_schema_spec
from protocol.sampling import SamplingParams

#: The schema: what an app asks a small assistant for (a record with a few typed fields).
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "answer": {"type": "string", "maxLength": 200},
        "confidence": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
    },
    "required": ["title", "answer", "confidence", "tags"],
    "additionalProperties": False,
}

PROMPTS = (
    "Why is the sky blue? Answer as JSON with title, answer, confidence and tags.",
    "What is the capital of France? Answer as JSON with title, answer, confidence and tags.",
    "Give one tip for learning to cook. Answer as JSON with title, answer, confidence and tags.",
    "What does a CPU do? Answer as JSON with title, answer, confidence and tags.",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", type=int, default=3, help=f"prompts to use (1..{len(PROMPTS)})")
    p.add_argument("--runs", type=int, default=2, help="runs per prompt")
    p.add_argument("--tokens", type=int, default=96, help="max new tokens per generation")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--tiny", action="store_true", help="tiny random models (smoke test)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")


def _models(tiny: bool, out: Path) -> tuple[Path, Path]:
    if tiny:
        from quantize.tiny import build_tiny_pair

        pair = build_tiny_pair(out)
        return pair.target_gguf, pair.draft_gguf
    from dssd_common.models import default_models

    d = default_models()
    for path in (d.target_gguf, d.draft_q4_0_gguf):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} not found: run `python -m quantize prepare-default`")
    return Path(d.target_gguf), Path(d.draft_q4_0_gguf)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    from benchmarks.compare import edge_server
    from device_runtime.drafter import LlamaDrafter
    from device_runtime.session import DeviceClient, GenerationConfig

    tmp = tempfile.TemporaryDirectory()
    target, draft = _models(args.tiny, Path(tmp.name))
    drafter = LlamaDrafter(draft, n_ctx=2048, n_threads=1)
    sampling = SamplingParams(args.temperature)
    grammar = json_schema_spec(SCHEMA, 0)
    rows: list[dict[str, Any]] = []
    with edge_server(target, how="thread", log_path=None) as url:
        client = DeviceClient(drafter, url, client_name="bench-structured")

        async def go() -> None:
            prompts = []
            for text in PROMPTS[: args.prompts]:
                try:
                    prompts.append(drafter.tokenize(drafter.chat_prompt([{"role": "user", "content": text}]),
                                                    add_bos=False))
                except ValueError:
                    prompts.append(drafter.tokenize(text))
            # warm-up (not measured): both kinds once
            for g in (None, grammar):
                await client.generate(prompts[0], GenerationConfig(max_new_tokens=8, sampling=sampling,
                                                                   gamma=args.gamma, pipeline=False, grammar=g))
            for run_i in range(args.runs):
                for p_i, ids in enumerate(prompts):
                    order = [("free", None), ("json", grammar)]
                    if (run_i + p_i) % 2:
                        order.reverse()
                    for kind, g in order:
                        cfg = GenerationConfig(max_new_tokens=args.tokens, sampling=sampling, gamma=args.gamma,
                                               seed=run_i, pipeline=False, grammar=g)
                        res = await client.generate(ids, cfg)
                        r = res.stats.rounds
                        rows.append({"kind": kind, "prompt": p_i, "run": run_i, "tokens": res.stats.tokens,
                                     "tokens_per_s": res.stats.tokens_per_s, "acceptance": r.acceptance_rate,
                                     "mean_accepted_length": r.mean_accepted_length,
                                     "text": res.text[:200]})
            await client.close()

        asyncio.run(go())
    drafter.close()
    tmp.cleanup()
    summary: dict[str, Any] = {}
    for kind in ("free", "json"):
        mine = [r for r in rows if r["kind"] == kind]
        summary[kind] = {k: statistics.median(r[k] for r in mine)
                         for k in ("tokens_per_s", "acceptance", "mean_accepted_length", "tokens")}
    ratios = [j["tokens_per_s"] / f["tokens_per_s"] for f, j in zip(
        [r for r in rows if r["kind"] == "free"], [r for r in rows if r["kind"] == "json"]) if f["tokens_per_s"]]
    summary["json_over_free_tokens_per_s"] = statistics.median(ratios) if ratios else float("nan")
    return {"config": {"prompts": args.prompts, "runs": args.runs, "tokens": args.tokens, "gamma": args.gamma,
                       "temperature": args.temperature, "tiny": args.tiny, "schema": SCHEMA},
            "summary": summary, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = ["| output | acceptance | mean accepted length | tokens/s | tokens |", "|---|---:|---:|---:|---:|"]
    for kind in ("free", "json"):
        k = s[kind]
        lines.append(f"| {'free text' if kind == 'free' else 'JSON schema'} | {k['acceptance']:.3f} | "
                     f"{k['mean_accepted_length']:.2f} | {k['tokens_per_s']:.1f} | {k['tokens']:.0f} |")
    lines.append(f"\nmedian paired ratio JSON / free tokens/s: {s['json_over_free_tokens_per_s']:.2f}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        result = run(args)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    return 0
