"""The serving-engine benchmarks run end to end on the tiny model (their numbers are the
benchmarks' business; here only that they run and report true facts):

* `benchmarks kv`: the slots and the old re-pack give the same logits, and the slots
  write exactly the new tokens' KV per round and copy none;
* `benchmarks prefill`: every setting reports rounds during the prefill;
* `benchmarks gpu`: refuses clearly without CUDA; its `--device cpu --quick` dry run
  passes its greedy check (the slot path equals `generate`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from benchmarks import gpu, kv, prefill_hol


def test_kv_benchmark_on_the_tiny_model(tiny_pair) -> None:  # noqa: ANN001
    r = kv.run(tiny_pair.target_gguf, sessions=4, context=40, repeats=2)
    assert r["max_abs_logit_diff"] < 1e-4
    assert r["kv_bytes_written_per_round"] == r["kv_bytes_of_new_tokens"]
    assert r["kv_bytes_copied_by_slots"] == 0
    assert r["repack_s"] > 0 and r["slots_s"] > 0


def test_prefill_benchmark_on_the_tiny_model(tiny_pair) -> None:  # noqa: ANN001
    rows = prefill_hol.run(tiny_pair.target_gguf, sessions=3, prompt=120, configs=[(0, 0), (16, 24)], rounds=2,
                           repeats=1)
    assert [(r["prefill_chunk"], r["token_budget"]) for r in rows] == [(0, 0), (16, 24)]
    assert all(r["during_rounds"] >= 1 and r["prefill_s"] > 0 for r in rows)


def _gpu_args(tmp_path: Path, target: Path, device: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    gpu.add_arguments(p)
    return p.parse_args(["--device", device, "--target", str(target), "--quick", "--skip-capacity",
                         "--dtypes", "float32", "--out", str(tmp_path)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_gpu_check_refuses_clearly_without_cuda(tmp_path: Path, tiny_pair, capsys) -> None:  # noqa: ANN001
    assert gpu.main(_gpu_args(tmp_path, tiny_pair.target_gguf, "cuda")) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_gpu_check_dry_run_on_cpu(tmp_path: Path, tiny_pair) -> None:  # noqa: ANN001
    assert gpu.main(_gpu_args(tmp_path, tiny_pair.target_gguf, "cpu")) == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    greedy = result["dtypes"]["float32"]["greedy"]
    assert greedy["equal"] == greedy["prompts"]
    assert {r["kind"] for r in result["dtypes"]["float32"]["steps"]} == {"verify", "edge-only step"}
