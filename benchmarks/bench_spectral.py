"""Cost of the spectral metrics, measured in one run.

1. dW's SVD from LoRA factors (QR of B and A^T, an r x r core) against the dense SVD of the
   same update, 2048 x 2048, r = 8 and 64.
2. ``analyze`` with ``--metrics spectrum,intruders,amplification`` on one LoRA run of N = 1 and
   N = 4 checkpoints: the base's SVD is shared, so N = 4 should cost little more than N = 1.
3. The same analysis a second time with the cache (``analyze(..., cache=DIR)``): ``spectrum``
   compares versions, so its results are recomputed, but the base SVD is read from
   ``DIR/base`` instead of computed again.

    .venv/bin/python benchmarks/bench_spectral.py            # ~30 seconds on one core

Everything runs on one torch thread (the engine's default for the CPU).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from dora_analysis import spectral as sp
from dora_analysis.analysis import analyze

SIZE = 2048
MATRICES = 4  # base matrices in the analysis benchmark
ANALYSIS_SIZE = 1024
RANK = 8


def timed(fn, repeat: int = 1) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_low_rank() -> None:
    print(f"1. SVD of a LoRA update dW = s·B·A, {SIZE} x {SIZE} (best of 3 for the low-rank path, 1 dense run)")
    for r in (8, 64):
        update = sp.LowRank(torch.randn(SIZE, r) * 0.01, torch.randn(r, SIZE) / SIZE**0.5, 2.0)
        low = timed(lambda u=update: sp.spectrum(sp.low_rank_svd(u).S), repeat=3)
        dense_dw = update.dense(torch.float64)
        dense64 = timed(lambda d=dense_dw: sp.spectrum(sp.dense_svd(d, dtype=torch.float64).S))
        dense32_dw = dense_dw.float()
        dense32 = timed(lambda d=dense32_dw: sp.spectrum(torch.linalg.svdvals(d)))
        print(
            f"   r = {r:2d}: low-rank {low * 1e3:8.2f} ms | dense float64 SVD {dense64:6.2f} s ({dense64 / low:7.0f}x) "
            f"| dense float32 svdvals {dense32:6.2f} s ({dense32 / low:7.0f}x)"
        )


def write_case(root: Path, steps: int) -> tuple[Path, Path]:
    """A base of MATRICES random matrices and a PEFT LoRA run of ``steps`` checkpoints."""
    gen = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(MATRICES)]
    base = root / "base"
    base.mkdir(parents=True)
    save_file(
        {f"{n}.weight": torch.randn(ANALYSIS_SIZE, ANALYSIS_SIZE, generator=gen) / ANALYSIS_SIZE**0.5 for n in names},
        base / "model.safetensors",
    )
    run = root / "lora"
    for step in range(1, steps + 1):
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        tensors = {}
        for n in names:
            tensors[f"base_model.model.{n}.lora_A.weight"] = torch.randn(RANK, ANALYSIS_SIZE, generator=gen) / ANALYSIS_SIZE**0.5
            tensors[f"base_model.model.{n}.lora_B.weight"] = torch.randn(ANALYSIS_SIZE, RANK, generator=gen) * 0.05 * step
        save_file(tensors, folder / "adapter_model.safetensors")
        config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": ["q_proj"], "base_model_name_or_path": None}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return base, run


def bench_steps_and_cache() -> None:
    metrics = ["spectrum", "intruders", "amplification"]
    print(
        f"2. analyze --metrics {','.join(metrics)}: {MATRICES} base matrices {ANALYSIS_SIZE} x {ANALYSIS_SIZE} (Gaussian), LoRA r = {RANK}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        base, run = write_case(Path(tmp), 4)
        analyze(base, run, steps=[1], metrics=metrics, progress=False)  # warm-up: imports, scipy, allocator
        one = timed(lambda: analyze(base, run, steps=[1], metrics=metrics, progress=False), repeat=3)
        four = timed(lambda: analyze(base, run, metrics=metrics, progress=False), repeat=3)
        print(f"   best of 3: N = 1 step: {one:6.2f} s | N = 4 steps: {four:6.2f} s | ratio {four / one:.2f}x (target <= 1.3x)")
        cache = Path(tmp) / "cache"
        first = timed(lambda: analyze(base, run, metrics=metrics, progress=False, cache=cache))
        second = timed(lambda: analyze(base, run, metrics=metrics, progress=False, cache=cache))
        print(f"3. cache (base SVD stored), N = 4: first run {first:6.2f} s | second run {second:6.2f} s ({first / second:.0f}x faster)")


def main() -> int:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, python {sys.version.split()[0]}")
    bench_low_rank()
    bench_steps_and_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
