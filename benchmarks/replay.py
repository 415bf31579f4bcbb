"""`python -m benchmarks replay`: the gamma controller replayed offline, in seconds.

A record of `benchmarks adaptive` takes 70 minutes and its auto/best-fixed ratios move by
several percent from run to run, so it cannot tell two controller settings apart. This
replays the real `GammaController` on real acceptance instead, under a timing model:

- **Traces** (`--traces`, built once when missing, ~9 minutes): for each built-in prompt
  and each draft, the target's greedy continuation (transformers, the edge's loader) and,
  at every position t of it, how many of the draft's greedy tokens after that prefix agree
  with it (`run[t]`). In greedy mode that fixes every round's outcome for any policy: a
  round at position t with gamma g accepts min(run[t], g), commits one more token, and a
  pipelined bonus guess is right iff run[t] > g.
- **Timing** (`Timing`): draft time per token, a verify time linear in gamma plus a fixed
  per-round overhead, the link's RTT, the prompt's prefill in round 1, the slow-down of a
  co-located edge while the device drafts ahead, and log-normal noise. The defaults were
  fitted to the fixed-gamma medians of the adaptive record at 207a2b0 (the curves over
  gamma agree within 13 %, and the optimum lands on the same gammas).
- **Replay** (`replay`) follows `DeviceClient`'s round loop: the controller chooses,
  a draft made ahead is used or extended, the next one is planned, and the controller
  observes what the device would have measured (round 1 untimed).

It answers "is setting A better than B" on the acceptance the default pair really has;
it does not replace the record (the timing is a model, and bandwidth is left out: a
greedy dssd round sends a few hundred bytes).
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.compare import PROFILES
from device_runtime.gamma import GammaController

#: per-token draft time measured alone on this machine (llama.cpp, one thread)
DRAFT_S = {"q4_0": 0.014, "q4_1": 0.017}
#: the adaptive benchmark's link profiles, by RTT (bandwidth is not modelled)
RTTS = {name: profile.rtt_s for name, profile in PROFILES.items()}


@dataclass(frozen=True)
class Timing:
    """A round's costs; defaults fitted to the fixed-gamma curves of the adaptive record."""

    draft_s: float
    rtt_s: float = 0.0
    verify_s: float = 0.10  # forward over the drafts (+1) on the edge
    verify_per_token_s: float = 0.005
    verify_empty_s: float = 0.07  # gamma 0: one position
    overhead_s: float = 0.06  # per round: Python, websockets, scheduling
    prefill_s: float = 0.3  # round 1: the prompt on the edge
    contention: float = 0.3  # verify slow-down per second of concurrent drafting ahead
    noise: float = 0.08  # sigma of log-normal noise on drafting and verifying

    def verify(self, gamma: int) -> float:
        base = self.verify_empty_s if gamma == 0 else self.verify_s + self.verify_per_token_s * gamma
        return base + self.overhead_s


def replay(
    runs: Sequence[int],
    tokens: int,
    timing: Timing,
    rng: np.random.Generator,
    *,
    gamma: int | None = None,
    controller: GammaController | None = None,
    pipeline: bool = True,
) -> tuple[float, list[int]]:
    """One greedy request of `tokens` tokens at a fixed `gamma` or with `controller`:
    (tokens per second, gamma of each round)."""
    if (gamma is None) == (controller is None):
        raise ValueError("pass a fixed gamma or a controller")
    pos = 0
    clock = 0.0
    ahead = 0  # tokens of the next round's draft already made
    gammas: list[int] = []
    while pos < tokens:
        remaining = tokens - pos - 1
        g = min(controller.choose() if controller else gamma, max(remaining, 0))  # type: ignore[type-var]
        start = clock
        first = not gammas
        fresh = max(g - ahead, 0) if ahead and g > 0 else g  # drafted in line (extending the ahead draft)
        inline = fresh * timing.draft_s * rng.lognormal(0, timing.noise) if fresh else 0.0
        if controller and fresh and not first:
            controller.observe_draft(inline, fresh)
        ahead = 0
        clock += inline
        verify = timing.verify(g) * rng.lognormal(0, timing.noise)
        run = runs[pos] if pos < len(runs) else 0
        accepted = min(run, g)
        n_ahead = 0
        if pipeline and g >= 1 and remaining > g + 1:
            planned = controller.planned_next() if controller else g
            n_ahead = min(planned, remaining - g - 1) + 1  # the bonus guess + the next draft
            verify += timing.contention * min(n_ahead * timing.draft_s, verify)
        wait = timing.rtt_s + verify + (timing.prefill_s if first else 0.0)
        if n_ahead > 1 and run > g:  # all passed and the bonus guess was right
            clock += max(wait, n_ahead * timing.draft_s)
            ahead = n_ahead - 1
            if controller:
                controller.observe_draft(n_ahead * timing.draft_s, n_ahead)
        else:
            clock += wait
            if n_ahead and controller:
                k = max(1, min(n_ahead, int(wait / timing.draft_s)))
                controller.observe_draft(k * timing.draft_s, k)
        pos += accepted + 1
        gammas.append(g)
        if controller:
            controller.observe(g, accepted, wait, clock - start, timed=not first)
    return tokens / clock, gammas


def compare(
    traces: Sequence[Sequence[int]],
    timing: Timing,
    make_controller: Callable[[], GammaController],
    *,
    tokens: int = 64,
    gammas: Sequence[int] = tuple(range(1, 9)),
    seed: int = 0,
) -> dict[str, Any]:
    """The adaptive benchmark's check on traces: the last trace warms the controller up,
    the others are trials; auto over the best fixed gamma (by median), paired per trial."""
    rng = np.random.default_rng(seed)
    *trials, warmup = traces
    controller = make_controller()
    replay(warmup, tokens, timing, rng, controller=controller)
    fixed = {g: [replay(t, tokens, timing, rng, gamma=g)[0] for t in trials] for g in gammas}
    runs = [replay(t, tokens, timing, rng, controller=controller) for t in trials]
    auto = [rate for rate, _ in runs]
    best = max(gammas, key=lambda g: statistics.median(fixed[g]))
    ratios = [a / b for a, b in zip(auto, fixed[best])]
    return {"ratio": statistics.median(ratios), "best_gamma": best,
            "mean_gamma": statistics.fmean(g for _, gs in runs for g in gs)}


def build_traces(target_path: Path, drafts: dict[str, Path], n_prompts: int, positions: int,
                 look: int = 14, progress: bool = True) -> dict[str, list[list[int]]]:
    """Agreement run lengths per draft, prompt and position (see the module doc)."""
    import torch
    from tqdm import tqdm

    from benchmarks.compare import build_prompts
    from device_runtime.drafter import LlamaDrafter
    from edge_service.backends.torch_backend import TorchTargetModel
    from protocol.sampling import SamplingParams

    target = TorchTargetModel(target_path, threads=1)
    greedy = SamplingParams(0.0)
    out: dict[str, list[list[int]]] = {}
    bar = tqdm(total=len(drafts) * n_prompts, unit="prompt", disable=not progress)
    for name, path in drafts.items():
        drafter = LlamaDrafter(path, n_ctx=2048, n_threads=1, max_gamma=look)
        try:
            out[name] = []
            for prompt in build_prompts(drafter, n_prompts):
                with torch.inference_mode():
                    ids = target.model.generate(
                        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                        do_sample=False, max_new_tokens=positions + look,
                        pad_token_id=target.model.generation_config.eos_token_id)[0, len(prompt):].tolist()
                runs = []
                for t in range(min(positions, len(ids))):
                    drafted = drafter.draft(prompt + ids[:t], look, greedy, np.random.default_rng(0)).ids
                    n = 0
                    while n < look and t + n < len(ids) and int(drafted[n]) == ids[t + n]:
                        n += 1
                    runs.append(n)
                out[name].append(runs)
                bar.update(1)
        finally:
            drafter.close()
    bar.close()
    return out


def run_replay(traces: dict[str, list[list[int]]], make_controller: Callable[[], GammaController],
               seeds: Sequence[int], tokens: int = 64, noise: float = 0.08) -> list[dict[str, Any]]:
    """Every (draft, profile) over several seeds (each seed: one simulated record)."""
    rows = []
    for draft, runs in traces.items():
        for profile, rtt in RTTS.items():
            timing = Timing(DRAFT_S.get(draft, 0.015), rtt, noise=noise)
            results = [compare(runs, timing, make_controller, tokens=tokens, seed=s) for s in seeds]
            ratios = [r["ratio"] for r in results]
            rows.append({"draft": draft, "profile": profile, "median_ratio": statistics.median(ratios),
                         "min_ratio": min(ratios), "best_gamma": results[0]["best_gamma"],
                         "auto_mean_gamma": statistics.fmean(r["mean_gamma"] for r in results)})
    return rows


def markdown(rows: list[dict[str, Any]], seeds: int) -> str:
    lines = [f"auto / best fixed gamma in replay ({seeds} simulated records per pair)", "",
             "| draft | profile | median | min | best fixed | auto mean gamma |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['draft']} | {r['profile']} | {r['median_ratio']:.3f} | {r['min_ratio']:.3f} | "
              f"g{r['best_gamma']} | {r['auto_mean_gamma']:.1f} |" for r in rows]
    return "\n".join(lines)


def main(args: Any) -> int:
    """The CLI (`python -m benchmarks replay`)."""
    if not args.traces.exists():
        from dssd_common.models import default_models

        d = default_models()
        traces = build_traces(d.target_gguf, {"q4_0": d.draft_q4_0_gguf, "q4_1": d.draft_q4_1_gguf},
                              n_prompts=8, positions=args.tokens + 16, progress=not args.no_progress)
        args.traces.parent.mkdir(parents=True, exist_ok=True)
        args.traces.write_text(json.dumps(traces))
    traces = json.loads(args.traces.read_text())

    def make() -> GammaController:
        return GammaController(args.max_gamma, pipeline=True)

    rows = run_replay(traces, make, range(args.seeds), tokens=args.tokens, noise=args.noise)
    print(markdown(rows, args.seeds))
    return 0

