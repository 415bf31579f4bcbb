"""ONNX Runtime edge on the default model: export, agreement with torch, verify-step cost.

`python -m benchmarks.onnx_edge` exports SmolLM2 (fp32 + int8) with `quantize
edge-export`, checks ONNX fp32 logits against torch and int8's top-1 agreement, and times
one verify step (a forward of gamma + 1 tokens on a cached context, then a rollback) for
torch fp32, ONNX fp32 and ONNX int8, interleaved, medians, one thread each. The export
takes 5-10 minutes on 2 cores, which is why this is a benchmark and not a test.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edge_service.backends.onnx_backend import OnnxTargetModel
from edge_service.backends.torch_backend import TorchTargetModel
from quantize.defaults import prepare_default_models
from quantize.edge_export import edge_export

SCRIPT = [[1, 9, 15, 20], [44], [5, 6, 7], [300]]


def _script(model) -> list[np.ndarray]:  # noqa: ANN001
    seq = model.new_sequence()
    out = [seq.forward(ids) for ids in SCRIPT]
    seq.rollback(3)
    out.append(seq.forward([11, 12]))
    return out


def _median_ms(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> int:
    models = prepare_default_models(progress=False)
    out = Path(tempfile.mkdtemp()) / "edge"
    start = time.perf_counter()
    result = edge_export(models.target_gguf, out, fmt="onnx", int8=True, threads=1)
    print(f"edge-export SmolLM2 onnx+int8: {time.perf_counter() - start:.0f} s, self-check {result.onnx_check}")
    torch_model = TorchTargetModel(models.target_gguf, threads=1)
    fp32 = OnnxTargetModel(out, threads=1, variant="fp32")
    int8 = OnnxTargetModel(out, threads=1, variant="int8")
    want = _script(torch_model)
    diff = max(float(np.abs(g - w).max()) for g, w in zip(_script(fp32), want))
    top1 = float(np.mean(np.concatenate(_script(int8)).argmax(-1) == np.concatenate(want).argmax(-1)))
    print(f"ONNX fp32 vs torch max |logit diff| {diff:.2e}; int8 top-1 agreement {top1:.2f}")
    gamma, context, repeats = 4, 64, 15
    runtimes = {"torch fp32": torch_model, "onnx fp32": fp32, "onnx int8": int8}
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, 40000, size=context)]
    verify_ms: dict[str, list[float]] = {name: [] for name in runtimes}
    step_ms: dict[str, list[float]] = {name: [] for name in runtimes}
    seqs = {name: m.new_sequence() for name, m in runtimes.items()}
    for seq in seqs.values():
        seq.forward(prompt)
    for _ in range(3):  # interleaved so background load hits every runtime alike
        for name, seq in seqs.items():
            verify_ms[name].append(_median_ms(lambda s=seq: (s.forward(list(range(500, 505))), s.rollback(context)),
                                              repeats))
            step_ms[name].append(_median_ms(lambda s=seq: (s.forward([500]), s.rollback(context)), repeats))
    base = statistics.median(verify_ms["torch fp32"])
    for name in runtimes:
        v, s = statistics.median(verify_ms[name]), statistics.median(step_ms[name])
        print(f"{name:<11} verify (gamma+1={gamma + 1}) {v:7.1f} ms  {v / base:5.2f}x torch  {v / s:5.2f} single steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
