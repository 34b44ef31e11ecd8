"""Training step time and peak memory: the project's LoRA / DoRA layers against PEFT's.

Measures, on the default model (all-MiniLM-L6-v2 + mean pooling + head, r = 8, alpha = 16,
query and value, batch 16 of the built-in synthetic sentences, AdamW):

* step time (forward + backward + optimizer update) of four variants built in one process:
  our LoRA, our DoRA, PEFT's LoRA, PEFT's DoRA. Rounds interleave the variants (in a
  rotating order) so that machine noise hits all of them alike; each ratio is the median over
  rounds of the ratio *within* a round;
* peak memory of each variant, each in its own fresh subprocess: on CPU, the growth of peak
  RSS (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` just before the first step)
  over 5 training steps; on CUDA, ``torch.cuda.max_memory_allocated`` over the same steps.
  At this size RSS is dominated by the runtime's own buffers, so the exact activation memory
  (bytes the autograd graph holds when backward starts) is reported beside it;
* the DoRA row norm alone, ours (expanded, never builds W0 + sBA) against PEFT's (builds it),
  on one 384 x 384 and one 4096 x 4096 matrix.

Usage::

    python benchmarks/bench_train.py                 # the table in docs/benchmarks.md
    python benchmarks/bench_train.py --rounds 5      # quicker, noisier
    python benchmarks/bench_train.py --callback      # DecompositionCallback overhead (target <= 1.05)

``--callback`` times ``transformers.Trainer`` on the reference configuration (PEFT DoRA on the
MiniLM encoder, r = 8, alpha = 16, query and value, batch 16 of the built-in synthetic
sentences, a save every 15 steps) with and without
:class:`dora_analysis.integrations.hf.DecompositionCallback`, in one process: one untimed
warm-up run of each (first save, first measurement, lazy imports), then rounds that alternate
which goes first. It reports the median over rounds of the within-round ratio, and the ratio of
the median times (the saves happen in both runs alike; the model is built outside the clock).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _stats import paired_ratio, rotated  # benchmarks/ is on sys.path when a benchmark runs

VARIANTS = ("ours-lora", "ours-dora", "peft-lora", "peft-dora")
LABELS = {"ours-lora": "ours LoRA", "ours-dora": "ours DoRA", "peft-lora": "PEFT LoRA", "peft-dora": "PEFT DoRA"}


def build(variant: str, model_path: Path, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """One model + optimizer for ``variant``, initialised from the same seed."""
    from dora_analysis.train import EncoderClassifier, TrainConfig
    from dora_analysis.train.loop import build_model, make_optimizer

    method = variant.split("-")[1]
    config = TrainConfig(method=method, out=Path("unused"), model=model_path)  # type: ignore[arg-type]
    torch.manual_seed(0)
    if variant.startswith("ours"):
        model = build_model(config, model_path, 2)
    else:
        import peft

        lora = peft.LoraConfig(
            r=config.rank, lora_alpha=config.alpha, target_modules=list(config.targets),
            use_dora=method == "dora", modules_to_save=["head"], lora_dropout=0.0,
        )  # fmt: skip
        model = peft.get_peft_model(EncoderClassifier.from_pretrained(model_path, 2), lora)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, make_optimizer(params, config)


def batches(model_path: Path, device: torch.device, n: int = 8, batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` batches of the default synthetic task."""
    from dora_analysis.train.data import BatchOrder, synthetic_task, tokenize
    from dora_analysis.train.model import load_tokenizer

    data = tokenize(synthetic_task(4000, seed=0), load_tokenizer(model_path), 128)
    order = BatchOrder(len(data), batch_size, seed=0)
    return [data.batch(order.indices(i), device) for i in range(n)]


def step_fn(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[dict[str, torch.Tensor]], None]:
    """One training step, as the trainer's loop does it."""

    def step(batch: dict[str, torch.Tensor]) -> None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(variants: list[str], model_path: Path, device: torch.device, rounds: int, per_round: int) -> dict[str, list[float]]:
    """Seconds per step of each variant, one entry per round; variants interleaved."""
    data = batches(model_path, device)
    steps = {v: step_fn(*build(v, model_path, device)) for v in variants}
    for step in steps.values():  # warm-up: allocator, kernels, optimizer state
        for b in data[:3]:
            step(b)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in rotated(variants, r):
            _sync(device)
            start = time.perf_counter()
            for i in range(per_round):
                steps[v](data[(r * per_round + i) % len(data)])
            _sync(device)
            times[v].append((time.perf_counter() - start) / per_round)
    return times


# --- memory: one fresh process per variant -------------------------------------------------------


def _rss_peak_kb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


def _rss_now_kb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def memory_child(variant: str, model_path: Path, device: torch.device, steps: int = 5) -> dict[str, float]:
    """Peak memory of ``steps`` training steps of ``variant`` in this (fresh) process, in MiB."""
    data = batches(model_path, device)
    model, optimizer = build(variant, model_path, device)
    step = step_fn(model, optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for i in range(steps):
            step(data[i % len(data)])
        torch.cuda.synchronize()
        return {"peak_growth_mib": (torch.cuda.max_memory_allocated() - base) / 2**20, "kind": "cuda max_memory_allocated"}
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM (peak RSS) to the current RSS
    before = _rss_now_kb()
    for i in range(steps):
        step(data[i % len(data)])
    return {"peak_growth_mib": (_rss_peak_kb() - before) / 1024, "peak_rss_mib": _rss_peak_kb() / 1024, "kind": "RSS (VmHWM)"}


def measure_memory(variants: list[str], model_path: Path, device: str) -> dict[str, dict[str, float]]:
    """Run :func:`memory_child` for each variant in its own subprocess."""
    out = {}
    for v in variants:
        cmd = [sys.executable, __file__, "--memory-child", v, "--model", str(model_path), "--device", device]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[v] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def saved_activation_mib(variants: list[str], model_path: Path, device: torch.device) -> dict[str, float]:
    """MiB of tensors autograd keeps for backward in one step (parameters not counted).

    Exact and noise-free, unlike RSS: this is the memory a DoRA forward adds over LoRA's
    (the paper's section 4.3 detach exists to keep it down).
    """
    batch = batches(model_path, device, n=1)[0]
    out = {}
    for v in variants:
        model, _ = build(v, model_path, device)

        def storage(t: torch.Tensor) -> int:
            return t.untyped_storage().data_ptr()

        params = {storage(p) for p in model.parameters()} | {storage(b) for b in model.buffers()}
        saved: list[weakref.ref[torch.Tensor]] = []

        def pack(t: torch.Tensor, saved: list[weakref.ref[torch.Tensor]] = saved) -> torch.Tensor:
            saved.append(weakref.ref(t))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = F.cross_entropy(logits, batch["labels"])
        # What the graph still holds when backward starts; tensors saved by a sub-graph that
        # was already freed (PEFT builds B A through one and drops it) are dead by now.
        alive = {storage(t): t.untyped_storage().nbytes() for t in (ref() for ref in saved) if t is not None}
        out[v] = sum(n for ptr, n in alive.items() if ptr not in params) / 2**20
        del loss
    return out


# --- the row norm alone --------------------------------------------------------------------------


def time_norms(sizes: tuple[int, ...] = (384, 4096), rank: int = 8, repeats: int = 20) -> list[tuple[int, float, float]]:
    """ms per DoRA row norm: ours (expanded) vs PEFT's (materialises W0 + s B A)."""
    from torch import nn

    from dora_analysis.train.layers import DoRALinear

    rows = []
    for n in sizes:
        layer = DoRALinear(nn.Linear(n, n, bias=False), rank=rank, alpha=2.0 * rank)
        with torch.no_grad():
            layer.lora_B.weight.normal_()
        a, b, w0, s = layer.lora_A.weight, layer.lora_B.weight, layer.base_layer.weight, layer.scaling

        def peft_norm(n: int = n, a: torch.Tensor = a, b: torch.Tensor = b, w0: torch.Tensor = w0, s: float = s) -> torch.Tensor:
            # PEFT's DoraLinearLayer: lora_weight = B(A(eye)).T, then ||W0 + s * lora_weight||_row
            eye = torch.eye(n, dtype=a.dtype)
            lora_weight = F.linear(F.linear(eye, a), b).T
            return torch.linalg.norm(w0 + s * lora_weight.detach(), dim=1)

        results = []
        for fn in (layer.weight_norm, peft_norm):
            fn()
            start = time.perf_counter()
            for _ in range(repeats):
                with torch.no_grad():
                    fn()
            results.append((time.perf_counter() - start) / repeats * 1e3)
        rows.append((n, results[0], results[1]))
    return rows


# --- report --------------------------------------------------------------------------------------


def callback_overhead(model_path: Path, *, steps: int, save_every: int, rounds: int, out: Path) -> dict[str, list[float]]:
    """Seconds of ``trainer.train()`` with and without the callback, alternating, ``rounds`` each.

    One warm-up run of each variant (``save_every`` steps: one save, one measurement) comes
    first and is not counted.
    """
    import shutil

    import peft
    import transformers

    from dora_analysis.integrations.hf import DecompositionCallback
    from dora_analysis.train.data import synthetic_task, tokenize
    from dora_analysis.train.model import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    encoded = tokenize(synthetic_task(steps * 16, seed=0), tokenizer, 128)
    lengths = encoded.attention_mask.sum(dim=1)
    data = [
        {"input_ids": encoded.input_ids[i, :n], "attention_mask": encoded.attention_mask[i, :n], "labels": encoded.labels[i]}
        for i, n in enumerate(lengths.tolist())
    ]  # each sentence at its own length; the collator pads each batch to its longest, as the built-in trainer does
    collator = transformers.DataCollatorWithPadding(tokenizer)
    times: dict[str, list[float]] = {"plain": [], "callback": []}
    schedule = [(-1, "plain"), (-1, "callback")]  # the warm-up, untimed
    for r in range(rounds):
        schedule += [(r, v) for v in rotated(["plain", "callback"], r)]
    for r, variant in schedule:
        torch.manual_seed(0)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
        config = peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["query", "value"], task_type="SEQ_CLS")
        model = peft.get_peft_model(model, config)
        folder = out / f"{variant}-{r}"
        args = transformers.TrainingArguments(
            output_dir=str(folder), max_steps=save_every if r < 0 else steps, save_steps=save_every, save_only_model=True, per_device_train_batch_size=16,
            learning_rate=1e-3, logging_steps=save_every, report_to="none", use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True, seed=0,
        )  # fmt: skip
        callbacks = [DecompositionCallback(figures=False)] if variant == "callback" else []
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=callbacks)
        start = time.perf_counter()
        trainer.train()
        if r >= 0:
            times[variant].append(time.perf_counter() - start)
        shutil.rmtree(folder, ignore_errors=True)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model folder (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    p.add_argument("--steps-per-round", type=int, default=5, help="steps per variant per round (default 5)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--callback", action="store_true", help="time transformers.Trainer with and without DecompositionCallback instead")
    p.add_argument("--steps", type=int, default=30, help="--callback: training steps per run (default 30, a save every 15)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 on a machine other processes keep busy)")
    args = p.parse_args(argv)

    from dora_analysis.train.model import default_model_path

    model_path = (args.model or default_model_path()).resolve()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, model_path, device)))
        return 0
    if args.callback:
        import tempfile

        rounds = max(2, args.rounds // 3)  # a Trainer run is long: 5 rounds by default
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            times = callback_overhead(model_path, steps=args.steps, save_every=15, rounds=rounds, out=Path(tmp))
        plain, with_cb = statistics.median(times["plain"]), statistics.median(times["callback"])
        within, lo, hi = paired_ratio(times, "callback", "plain")
        print(
            f"# bench_train --callback: {model_path}, PEFT DoRA r=8 alpha=16 on query+value, batch 16 of the synthetic sentences, "
            f"{args.steps} steps, a save every 15, 1 warm-up + {rounds} alternating rounds, {torch.get_num_threads()} threads, "
            f"{time.perf_counter() - started:.0f} s in all"
        )
        print(f"plain Trainer     {plain:8.2f} s  (runs: {', '.join(f'{t:.2f}' for t in times['plain'])})")
        print(f"with callback     {with_cb:8.2f} s  (runs: {', '.join(f'{t:.2f}' for t in times['callback'])})")
        print(f"overhead ratio    {within:8.3f}    median of within-round ratios (IQR {lo:.3f}-{hi:.3f}); target <= 1.05")
        print(f"                  {with_cb / plain:8.3f}    ratio of the medians")
        return 0

    try:
        import peft
    except ImportError:
        print("peft is not installed: timing our layers only", file=sys.stderr)
        variants = ["ours-lora", "ours-dora"]
    else:
        variants = list(VARIANTS)
    started = time.perf_counter()
    times = time_steps(variants, model_path, device, args.rounds, args.steps_per_round)
    memory = {} if args.no_memory else measure_memory(variants, model_path, args.device)
    saved = saved_activation_mib(variants, model_path, device)
    norms = time_norms()

    print(
        f"# bench_train: {model_path}, r=8 alpha=16 on query+value, batch 16, {args.device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}" + (f", peft {peft.__version__}" if "peft-dora" in variants else "")
    )
    print(f"# {args.rounds} interleaved rounds x {args.steps_per_round} steps per variant; {time.perf_counter() - started:.0f} s in all\n")
    mem_kind = next(iter(memory.values()))["kind"] if memory else "-"
    print(f"{'variant':<10} {'ms/step (median)':>17} {'IQR':>13} {'peak mem. growth MiB':>21} {'saved for backward MiB':>23}")
    for v in variants:
        t = sorted(x * 1e3 for x in times[v])
        q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
        mem = f"{memory[v]['peak_growth_mib']:.1f}" if v in memory else "-"
        print(f"{LABELS[v]:<10} {statistics.median(t):>17.1f} {f'{q[0]:.1f}-{q[2]:.1f}':>13} {mem:>21} {saved[v]:>23.2f}")
    print(f"(peak memory: {mem_kind} growth over 5 steps, each variant in a fresh process, after the model is built;")
    print(" saved for backward: bytes of the non-parameter tensors the autograd graph holds when backward starts, exact)\n")

    print(f"{'ratio (median of within-round ratios)':<40} {'measured':>9} {'IQR':>13} {'target':>10}")
    checks = [("ours-dora", "ours-lora", "<= 1.15"), ("ours-dora", "peft-dora", "<= 1.00"), ("peft-dora", "peft-lora", "(ref. 1.26)")]
    for num, den, target in checks:
        if num in times and den in times:
            med, lo, hi = paired_ratio(times, num, den)
            print(f"{LABELS[num] + ' / ' + LABELS[den]:<40} {med:>9.3f} {f'{lo:.3f}-{hi:.3f}':>13} {target:>10}")
    print("\nDoRA row norm alone (ms, no grad)   ours: expanded   PEFT: materialised")
    for n, ours, theirs in norms:
        print(f"  {n} x {n}, r=8{'':<19} {ours:>9.3f} {theirs:>17.3f}   ({theirs / ours:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
