"""``dora-train``: FT, LoRA and DoRA runs with intermediate checkpoints, from the shell.

Thin by design: parse into a :class:`~dora_analysis.train.config.TrainConfig`, call
:func:`~dora_analysis.train.loop.train`, print what was written. torch and transformers are
imported after parsing, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..console import run_main

if TYPE_CHECKING:
    from .config import TrainConfig
    from .loop import TrainResult

PROG = "dora-train"

EPILOG = """\
quick start (all-MiniLM-L6-v2, built-in synthetic task; 20-40 s each on 2 CPU cores):
  dora-train --method dora --out runs/dora
  dora-train --method lora --out runs/lora
  dora-train --method ft   --out runs/ft --save-steps 195,210,225,240   # FT snapshots are ~90 MB
  dora-analyze runs/dora/checkpoint-240 --modules 'attention\\.self\\.query'

more:
  dora-train --method dora --out runs/tab6 --magnitude-only 'attention\\.output\\.dense|intermediate'
  dora-train --method lora --out runs/mine --model path/to/hf_model --data train.jsonl \\
             --target-regex 'layer\\.\\d+\\.attention\\.self\\.(query|key|value)'
  dora-train --method dora --out runs/dora --resume        # continue after a kill

exit status: 0 ok, 2 bad input, 130 interrupted (resume with --resume).
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``dora-train`` argument parser (defaults come from :class:`TrainConfig`)."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Fine-tune a local transformers encoder with a classification head by full fine-tuning, "
        "LoRA or DoRA, saving checkpoints that dora-analyze (and PEFT) read.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", required=True, choices=("ft", "lora", "dora"), help="full fine-tuning, LoRA or DoRA")
    p.add_argument("--out", required=True, type=Path, metavar="RUN_DIR", help="run folder (checkpoint-N/, metrics.csv)")

    src = p.add_argument_group("model and data")
    src.add_argument("--model", type=Path, metavar="PATH", help="local transformers model folder (default: bundled all-MiniLM-L6-v2)")
    src.add_argument("--data", type=Path, metavar="FILE", help="JSONL or CSV of text,label (default: built-in synthetic task)")
    src.add_argument("--synthetic-size", type=int, default=4000, metavar="N", help="synthetic sentences (default 4000)")
    src.add_argument("--negation-p", type=float, default=0.3, metavar="P", help="synthetic: probability of 'not' (default 0.3)")
    src.add_argument("--flip-p", type=float, default=0.2, metavar="P", help="synthetic: label noise (default 0.2)")
    src.add_argument(
        "--noise",
        choices=("example", "sentence"),
        default="example",
        help="synthetic: flip each occurrence independently (default) or each distinct sentence the same way "
        "every time (learnable exceptions)",
    )
    src.add_argument(
        "--words",
        choices=("rare", "common"),
        default="rare",
        help="synthetic: adjectives; rare ones (default) keep all-MiniLM-L6-v2 learning to step 240, common ones are learnt by step ~90",
    )
    src.add_argument("--max-length", type=int, default=128, metavar="T", help="truncate texts to T tokens (default 128)")
    src.add_argument("--eval-size", type=int, default=512, metavar="N", help="at each checkpoint, loss on a fixed sample of N training examples (default 512; 0: off)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=240, metavar="N", help="optimizer updates (default 240)")
    opt.add_argument("--batch-size", type=int, default=16, metavar="B", help="examples per step (default 16)")
    opt.add_argument("--lr", type=float, metavar="LR", help="learning rate (default 1e-4 for ft, 1e-3 for lora/dora)")
    opt.add_argument("--weight-decay", type=float, default=0.1, metavar="WD", help="AdamW weight decay, every method (default 0.1)")
    opt.add_argument("--schedule", choices=("constant", "linear", "cosine"), default="linear", help="lr schedule after warmup (default linear decay to 0)")
    opt.add_argument("--warmup-steps", type=int, default=0, metavar="N", help="linear warmup steps (default 0)")
    opt.add_argument("--max-grad-norm", type=float, metavar="C", help="clip the gradient norm (default: no clipping)")

    ada = p.add_argument_group("adapters (lora / dora)")
    ada.add_argument("--rank", "-r", type=int, default=8, help="rank r (default 8)")
    ada.add_argument("--alpha", type=float, default=16.0, help="lora_alpha; scale s = alpha / r (default 16)")
    ada.add_argument("--rslora", action="store_true", help="rank-stabilised scale s = alpha / sqrt(r)")
    ada.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapter input (default 0)")
    ada.add_argument("--targets", metavar="NAME[,NAME...]", default="query,value", help="modules whose path is or ends with .NAME (default query,value)")
    ada.add_argument("--target-regex", metavar="REGEX", help="regex searched in module paths, instead of --targets")
    ada.add_argument("--magnitude-only", metavar="REGEX", help="dora: these modules (added to the targets; this wins where both match) train their magnitude m only (paper table 6)")

    run = p.add_argument_group("checkpoints and running")
    run.add_argument("--save-every", type=int, metavar="K", help="checkpoint every K steps (default 15; 0 or with --save-steps: off)")
    run.add_argument("--save-steps", metavar="N[,N...]", help="checkpoint at these steps (the last step is always saved)")
    run.add_argument("--seed", type=int, default=0, help="seed of data, init and dropout (default 0)")
    run.add_argument("--device", default="auto", help="cpu, cuda, or auto (default: cuda when available)")
    run.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last complete checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    run.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Turn parsed arguments into a validated :class:`TrainConfig`."""
    from ..errors import InputError
    from .config import TrainConfig

    try:
        save_steps = tuple(int(s) for s in (args.save_steps or "").replace(" ", "").split(",") if s)
    except ValueError:
        raise InputError(f"--save-steps takes comma-separated integers, got {args.save_steps!r}") from None
    targets = tuple(t for t in args.targets.replace(" ", "").split(",") if t)
    return TrainConfig(
        method=args.method, out=args.out, model=args.model, data=args.data,
        synthetic_size=args.synthetic_size, synthetic_negation_p=args.negation_p, synthetic_flip_p=args.flip_p,
        synthetic_noise=args.noise, synthetic_words=args.words,
        max_length=args.max_length, eval_size=args.eval_size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, schedule=args.schedule, warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm, rank=args.rank, alpha=args.alpha, rslora=args.rslora,
        dropout=args.dropout, targets=targets, target_regex=args.target_regex, magnitude_only=args.magnitude_only,
        save_every=args.save_every, save_steps=save_steps, seed=args.seed, device=args.device,
        resume=args.resume, progress=not args.quiet,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dora-train``; returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: _run(args), debug=args.debug, on_interrupt="interrupted; continue with --resume")


def _run(args: argparse.Namespace) -> int:
    from .loop import train

    config = config_from_args(args)
    started = time.perf_counter()
    result = train(config)
    if not args.quiet:
        print(format_result(result, time.perf_counter() - started))
    return 0


def format_result(result: TrainResult, seconds: float) -> str:
    """A short report: where the run is, its checkpoints, and the loss along the way."""
    lines = [f"run: {result.run_dir}  ({seconds:.1f} s" + (f", resumed at step {result.resumed_from})" if result.resumed_from is not None else ")")]
    if not result.checkpoints:
        lines.append("nothing to do: the run is already complete")
        return "\n".join(lines)
    by_step = {int(h["step"]): h for h in result.history}
    lines.append(f"{'checkpoint':<16} {'loss (last 15 steps)':>20} {'eval loss':>10} {'eval acc':>9} {'lr':>10}")
    for ckpt in result.checkpoints:
        step = int(ckpt.name.rsplit("-", 1)[1])
        window = [by_step[s]["loss"] for s in range(max(1, step - 14), step + 1) if s in by_step]
        rec = by_step.get(step, {})
        ev_loss, ev_acc = rec.get("eval_loss", float("nan")), rec.get("eval_accuracy", float("nan"))
        lines.append(
            f"{ckpt.name:<16} {sum(window) / len(window):>20.4f} {ev_loss:>10.4f} {ev_acc:>9.3f} {rec.get('learning_rate', float('nan')):>10.2e}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
