"""Benchmark: is `analyze` bound by reading the checkpoints, and is its memory a few matrices?

Makes a synthetic LLaMA-shaped base / tuned pair in bf16 (sharded safetensors, as Hugging
Face saves them), then measures, each in a fresh subprocess so that peak RSS is its own:

  read     open both checkpoints and read every tensor, upcast to float32 (touching every
           byte: safetensors may map a tensor lazily) -- the floor for any comparison;
  analyze  `dora_analysis.analyze(base, tuned, all_modules=True)` on the same pair, so it
           reads exactly the same tensors.

Runs alternate (read, analyze, read, analyze, ...) after a warm-up that puts both pairs in the
page cache, and the median of each is reported. Then the same for a model twice as deep, to
show that peak memory does not grow with the model.

Targets (issue "Core"): analyze / read <= 1.3; peak RSS <= 3 x the largest float32 matrix
+ 500 MB, about the same for the twice-as-large model.

With --engines, instead: serial against the ray engine with 1 and 2 workers, and with 2 workers
sending every plan task as its own Ray task (unbatched); what one Ray task costs beyond its work
(no-op tasks); and the peak RSS of the pair saved as .bin files. A round is one fresh process
per worker count that starts a local Ray cluster, warms its workers, then times serial and Ray
back to back, in a rotating order and then in reverse (A B B A). A speedup is the median over
rounds of serial / engine within a round: on these shared cores the speed of a core changes by
half from one few seconds to the next, so only runs a moment apart compare; a round's two
orders cancel a drift within it. Serial runs beside the idle cluster, which can only slow it:
the cluster's CPU over the serial runs is printed, as a share of their time, which bounds how
much that raises the ratios. The ratio of the medians and of the best rounds are printed beside
it.

Usage:
    python benchmarks/bench_analyze.py                 # 8 and 16 layers (~1.1 and ~1.9 GB)
    python benchmarks/bench_analyze.py --layers 2 --repeats 1 --no-double   # quick look
    python benchmarks/bench_analyze.py --engines --layers 8 --repeats 9     # the engine rows
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _stats import paired_ratio, rotated  # benchmarks/ is on sys.path when a benchmark runs

# LLaMA-style shapes at ~1B-parameter scale (TinyLlama-1.1B: hidden 2048, MLP 5632, vocab 32000).
HIDDEN, MLP, VOCAB = 2048, 5632, 32000
SHARD_BYTES = 500 * 2**20


def llama_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "mlp.gate_proj.weight"] = (MLP, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (MLP, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, MLP)
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def write_pair(root: Path, layers: int) -> tuple[Path, Path]:
    """Write base/ and tuned/ (tuned = base moved a little, as a fine-tune would), sharded."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    base_dir, tuned_dir = root / "base", root / "tuned"
    base_dir.mkdir(parents=True)
    tuned_dir.mkdir()
    shard: dict[str, dict[str, torch.Tensor]] = {"base": {}, "tuned": {}}
    weight_map: dict[str, str] = {}
    size, n = 0, 0

    def flush() -> None:
        nonlocal size, n
        if not shard["base"]:
            return
        n += 1
        for side, folder in (("base", base_dir), ("tuned", tuned_dir)):
            save_file(shard[side], folder / f"model-{n:05d}.safetensors")
            shard[side] = {}
        size = 0

    for name, shape in llama_shapes(layers).items():
        w = torch.randn(shape, generator=gen) * 0.02
        shard["base"][name] = w.to(torch.bfloat16)
        shard["tuned"][name] = (
            w * (1 + 0.01 * torch.randn(shape[0], *[1] * (len(shape) - 1), generator=gen)) + 0.002 * torch.randn(shape, generator=gen)
        ).to(torch.bfloat16)
        weight_map[name] = f"model-{n + 1:05d}.safetensors"
        size += w.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    flush()
    for folder in (base_dir, tuned_dir):
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return base_dir, tuned_dir


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over exec
    from the parent, so a child would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _warm_worker() -> int:
    """Import what a Ray task imports, so the timed run finds its workers ready."""
    import os

    import torch  # noqa: F401

    import dora_analysis.engine_ray  # noqa: F401 - the import is the point

    time.sleep(0.5)  # hold the worker so each warm-up call lands on its own process
    return os.getpid()


def _noop(i: int) -> list[dict[str, float]]:
    return [{"index": float(i)}]  # a record's size


def _start_ray(workers: int) -> None:
    """A local cluster with ``workers`` CPUs, started as the engine starts one, its worker
    processes started and warm."""
    import ray

    from dora_analysis import engine_ray

    engine_ray._connect(ray, None, workers)
    # Ray starts its worker processes on first use, and each then imports torch and the
    # package: seconds of start-up that a cluster pays once, not per analysis. Start and warm
    # every worker before the clock, as the imports are.
    warm = ray.remote(num_cpus=1)(_warm_worker)
    ray.get([warm.remote() for _ in range(workers)])


def _timed_analysis(mode: str, base: str, tuned: str) -> float:
    """Seconds for one ``analyze`` of the pair with the engine that ``mode`` names."""
    from dora_analysis import engine_ray
    from dora_analysis.analysis import analyze

    batches = engine_ray.BATCHES_PER_CPU
    if mode.endswith("-unbatched"):
        engine_ray.BATCHES_PER_CPU = 10**9  # every plan task its own Ray task
    try:
        t0 = time.perf_counter()
        analyze(base, tuned, all_modules=True, progress=False, engine="serial" if mode == "serial" else "ray")
        return time.perf_counter() - t0
    finally:
        engine_ray.BATCHES_PER_CPU = batches


def child(mode: str, base: str, tuned: str) -> None:
    """Run one measurement in this (fresh) process; print JSON with seconds and peak RSS."""
    # Imports happen before the clock starts: the benchmark times work, not interpreter start-up.
    # (dora_analysis imports its modules lazily, so import the function itself.)
    import torch  # noqa: F401 - both modes use it; import it outside the timing
    from safetensors import safe_open

    from dora_analysis.analysis import analyze

    if mode.startswith("engines"):
        # One round of the engine rows: serial and Ray with W workers, timed back to back in
        # this process, in the order given and then in reverse (A B B A), on a cluster started
        # for this round. Ray sits idle while serial runs; its processes' CPU over those runs is
        # reported: at most that much of serial's time is Ray's doing.
        workers, order = int(mode.split(":")[1]), mode.split(":")[2].split(",")
        _start_ray(workers)
        times: dict[str, list[float]] = {m: [] for m in order}
        ray_cpu = serial_s = 0.0
        for m in order + order[::-1]:
            before = _ray_cpu_seconds()
            times[m].append(_timed_analysis(m, base, tuned))
            if m == "serial":
                ray_cpu += sum(cpu - before.get(pid, 0.0) for pid, cpu in _ray_cpu_seconds().items())
                serial_s += times[m][-1]
        print(json.dumps({"mode": mode, "times": times, "ray_idle_cpu_share": ray_cpu / serial_s}))
        return
    t0 = time.perf_counter()
    if mode == "read":
        total = 0
        for folder in (base, tuned):
            for f in sorted(Path(folder).glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        total += h.get_tensor(k).float().numel()
    elif mode == "ray1-noop":
        import ray

        _start_ray(1)
        # What one Ray task costs beyond its work: 200 no-op tasks, two in flight.
        noop = ray.remote(num_cpus=1)(_noop)
        t0 = time.perf_counter()
        pending = [noop.remote(i) for i in range(2)]
        for i in range(2, 200):
            _, pending = ray.wait(pending, num_returns=1)
            pending.append(noop.remote(i))
        ray.get(pending)
        print(json.dumps({"mode": mode, "seconds": (time.perf_counter() - t0) / 200, "peak_rss_mb": 0.0, "items": 200}))
        return
    else:
        total = len(analyze(base, tuned, all_modules=True, progress=False))
    seconds = time.perf_counter() - t0
    peak_mb = _peak_rss_mb()
    print(json.dumps({"mode": mode, "seconds": seconds, "peak_rss_mb": peak_mb, "items": total}))


def _ray_cpu_seconds() -> dict[int, float]:
    """User + system CPU seconds of each process this one started (Ray's), by pid."""
    import psutil

    seconds = {}
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
        except psutil.Error:  # a Ray helper process may exit at any time
            continue
        seconds[p.pid] = t.user + t.system
    return seconds


def measure(mode: str, base: Path, tuned: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(base), str(tuned)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_pair(root: Path, layers: int, repeats: int) -> dict[str, float]:
    t0 = time.perf_counter()
    base, tuned = write_pair(root / f"L{layers}", layers)
    gb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e9
    print(f"\n{layers} layers: wrote base + tuned, {gb:.2f} GB each in bf16 ({time.perf_counter() - t0:.0f} s)", flush=True)
    measure("read", base, tuned)  # warm-up: both pairs into the page cache
    runs: dict[str, list[dict[str, float]]] = {"read": [], "analyze": []}
    for i in range(repeats):
        for mode in ("read", "analyze"):
            r = measure(mode, base, tuned)
            runs[mode].append(r)
            print(f"  run {i + 1} {mode:8s} {r['seconds']:7.2f} s   peak RSS {r['peak_rss_mb']:7.0f} MB", flush=True)
    largest = max(a * (b if len(s) > 1 else 1) for s in llama_shapes(layers).values() for a, b in [(s[0], s[-1])]) * 4 / 2**20
    read_s = statistics.median(r["seconds"] for r in runs["read"])
    analyze_s = statistics.median(r["seconds"] for r in runs["analyze"])
    return {
        "layers": layers,
        "gb": gb,
        "read_s": read_s,
        "analyze_s": analyze_s,
        "ratio": analyze_s / read_s,
        "read_rss": max(r["peak_rss_mb"] for r in runs["read"]),
        "analyze_rss": max(r["peak_rss_mb"] for r in runs["analyze"]),
        "largest_f32_mb": largest,
        "rss_target": 3 * largest + 500,
    }


def write_bin_pair(base: Path, tuned: Path, root: Path) -> tuple[Path, Path]:
    """The same pair as one pytorch_model.bin each (torch.save, zip format)."""
    import torch
    from safetensors.torch import load_file

    out = []
    for src, name in ((base, "base-bin"), (tuned, "tuned-bin")):
        state = {}
        for f in sorted(src.glob("*.safetensors")):
            state |= load_file(f)
        (root / name).mkdir()
        torch.save(state, root / name / "pytorch_model.bin")
        del state
        out.append(root / name)
    return out[0], out[1]


def bench_engines(root: Path, layers: int, repeats: int) -> None:
    """Serial vs ray with 1 and 2 workers on the LLaMA-shaped pair; the .bin pair's peak RSS."""
    base, tuned = root / f"L{layers}" / "base", root / f"L{layers}" / "tuned"
    if not base.is_dir():
        base, tuned = write_pair(root / f"L{layers}", layers)
    measure("read", base, tuned)  # page cache
    # A round: one child per worker count, each timing serial and Ray back to back (A B B A).
    rounds: list[dict[str, float]] = []  # per child: each mode's mean seconds
    share: list[float] = []
    for i in range(repeats):
        for workers in (1, 2) if i % 2 == 0 else (2, 1):
            modes = rotated(["serial", f"ray{workers}"] + (["ray2-unbatched"] if workers == 2 else []), i)
            r = measure(f"engines:{workers}:{','.join(modes)}", base, tuned)
            rounds.append({m: statistics.fmean(t) for m, t in r["times"].items()})
            share.append(r["ray_idle_cpu_share"])
            runs = "  ".join(f"{m} {' '.join(f'{x:.2f}' for x in t)}" for m, t in r["times"].items())
            print(f"  round {i + 1}, {workers} worker(s): {runs} s", flush=True)
    print(f"\nengines on {layers} layers ({repeats} rounds; a round times serial and Ray back to back in one")
    print("process, A B B A, on a cluster started for it; Ray's start-up is outside the clock, as imports are)")
    print("speedup = serial / engine; within-round: the median over rounds of the ratio of the round's means")
    print("engine           median s  speedup: within-round (IQR)  of medians  of bests")
    serial = [r["serial"] for r in rounds]
    print(f"{'serial':16s} {statistics.median(serial):8.2f}  {1:15.2f} ({1:.2f}-{1:.2f})  {1:10.2f}  {1:8.2f}")
    within: dict[str, float] = {}
    for mode, label in (("ray1", "ray x1"), ("ray2", "ray x2"), ("ray2-unbatched", "ray x2 unbatched")):
        paired = {"serial": [r["serial"] for r in rounds if mode in r], mode: [r[mode] for r in rounds if mode in r]}
        within[mode], lo, hi = paired_ratio(paired, "serial", mode)
        t = statistics.median(paired[mode])
        ratio_of_medians = statistics.median(paired["serial"]) / t
        best = min(paired["serial"]) / min(paired[mode])
        print(f"{label:16s} {t:8.2f}  {within[mode]:15.2f} ({lo:.2f}-{hi:.2f})  {ratio_of_medians:10.2f}  {best:8.2f}")
    print(f"Ray's idle processes while serial ran: {100 * statistics.median(share):.1f}% of serial's time in CPU (median)")
    print(f"target: ray x2 >= 1.5 x serial (median of within-round ratios): {'met' if within['ray2'] >= 1.5 else 'MISSED'}")
    noop = measure("ray1-noop", base, tuned)
    print(f"one Ray task's own cost (200 no-op tasks on one worker, two in flight): {noop['seconds'] * 1e3:.1f} ms")
    bin_base, bin_tuned = write_bin_pair(base, tuned, root / f"L{layers}")
    measure("read", base, tuned)
    st = measure("analyze", base, tuned)
    bn = measure("analyze", bin_base, bin_tuned)
    largest = max(s[0] * (s[-1] if len(s) > 1 else 1) for s in llama_shapes(layers).values()) * 4 / 2**20
    target = 3 * largest + 500
    print("\npair          analyze (s)  peak RSS   target RSS (3 x largest f32 + 500 MB)")
    print(f"safetensors  {st['seconds']:11.2f}  {st['peak_rss_mb']:6.0f} MB  {target:6.0f} MB")
    print(f".bin         {bn['seconds']:11.2f}  {bn['peak_rss_mb']:6.0f} MB  {target:6.0f} MB")
    print(f".bin peak RSS within the bound: {'met' if bn['peak_rss_mb'] <= target else 'MISSED'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the first model (default 8: ~1.1 GB bf16)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each mode (median reported)")
    p.add_argument("--no-double", action="store_true", help="skip the twice-as-deep model")
    p.add_argument("--engines", action="store_true", help="only the engine rows (serial vs ray x1, x2) and the .bin pair's RSS")
    p.add_argument("--workdir", type=Path, help="where to write the synthetic checkpoints (default: a temp dir, removed)")
    p.add_argument("--child", nargs=3, metavar=("MODE", "BASE", "TUNED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        if args.engines:
            bench_engines(Path(tmp), args.layers, args.repeats)
            return
        results = [bench_pair(Path(tmp), args.layers, args.repeats)]
        if not args.no_double:
            results.append(bench_pair(Path(tmp), 2 * args.layers, args.repeats))
    print(
        "\nlayers  size/ckpt  read (s)  analyze (s)  analyze/read  peak RSS read  peak RSS analyze  target RSS (3 x largest f32 + 500 MB)"
    )
    for r in results:
        print(
            f"{r['layers']:6d}  {r['gb']:6.2f} GB  {r['read_s']:8.2f}  {r['analyze_s']:11.2f}  {r['ratio']:12.2f}"
            f"  {r['read_rss']:10.0f} MB  {r['analyze_rss']:13.0f} MB  {r['rss_target']:8.0f} MB"
        )
    ok_ratio = all(r["ratio"] <= 1.3 for r in results)
    ok_rss = all(r["analyze_rss"] <= r["rss_target"] for r in results)
    print(f"\nratio target <= 1.3: {'met' if ok_ratio else 'MISSED'};  peak RSS target: {'met' if ok_rss else 'MISSED'}")


if __name__ == "__main__":
    main()
