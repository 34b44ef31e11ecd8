"""``dora-analyze``: magnitude / direction analysis of fine-tuned checkpoints from the shell.

Thin by design: parse, call :func:`dora_analysis.analyze` and :func:`dora_analysis.summarize`,
print tables, write files. Heavy imports (torch, pandas) happen after parsing so ``--help`` is
instant.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..console import run_main

if TYPE_CHECKING:
    import pandas as pd

PROG = "dora-analyze"

EPILOG = """\
quick start:
  dora-analyze base/ runs/ft runs/lora runs/dora --out report/
      base/           the pretrained model (folder or weights file)
      runs/ft ...     run folders with checkpoint-N/ snapshots, or single checkpoints,
                      full weights or adapters (PEFT LoRA/DoRA, ...)
  dora-analyze base/ tuned/ --modules 'attention\\.self\\.query' --last 4
  dora-analyze base/ runs/lora --expect-sign positive      # regression check, exit 1 if not
  dora-analyze runs/dora/checkpoint-240                    # an adapter naming its local base

exit status: 0 ok, 1 --expect-sign failed, 2 bad input.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Per-matrix magnitude change dM and direction change dD of fine-tuned weights "
        "(DoRA paper, Liu et al. 2024, section 3.2), and how they correlate.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="BASE then TUNED [TUNED ...]; or one adapter that names its base")
    sel = p.add_argument_group("what to analyse")
    sel.add_argument("--modules", metavar="REGEX", help="regex searched in module names (default: 2-D weights inside numbered blocks)")
    sel.add_argument("--all-modules", action="store_true", help="every tensor with >= 2 dims: embeddings, heads, convs too")
    sel.add_argument("--steps", metavar="N[,N...]", help="keep only these training steps")
    sel.add_argument("--last", type=int, metavar="K", help="keep only the last K steps of each run (the paper: 4)")
    sel.add_argument("--method", metavar="NAME", help="label for the method column (default: ft, or the adapter's)")
    sel.add_argument(
        "--axis",
        choices=("out", "in"),
        default="out",
        help="vectors to normalise: 'out' (default, the paper's and PEFT's: one per output feature, rows of "
        "an [out, in] weight) or 'in' (one per input feature, as some re-implementations do)",
    )
    sel.add_argument("--dora-scale-axis", choices=("out", "in"), help="kohya/LyCORIS dora_scale axis when the shape cannot tell (square matrices)")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, metavar="DIR", help="write layers.csv, summary.csv, summary.json, figures/ and report.md there")
    out.add_argument("--format", choices=("png", "svg", "pdf"), default="png", help="figure format (default png)")
    out.add_argument("--no-plots", action="store_true", help="skip figures (and their links in the report)")
    out.add_argument("--expect-sign", choices=("positive", "negative"), help="exit 1 if a run's pooled Pearson r has the other sign")
    out.add_argument("--list", action="store_true", help="list the base's tensors that would be analysed, then exit")
    out.add_argument("--quiet", action="store_true", help="no progress bar, no tables")
    run = p.add_argument_group("running")
    run.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    run.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dora-analyze``; returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: _run(args), debug=args.debug)


def _parse_steps(text: str | None) -> list[int] | None:
    from ..errors import InputError

    if text is None:
        return None
    try:
        return [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise InputError(f"--steps takes comma-separated integers, got {text!r}") from None


def _resolve_paths(paths: list[str]) -> tuple[Path, list[Path]]:
    """BASE and TUNED paths; a lone adapter path names its base in its config."""
    from ..analysis import base_path_for
    from ..errors import InputError

    if len(paths) >= 2:
        return Path(paths[0]), [Path(p) for p in paths[1:]]
    only = Path(paths[0])
    if not only.exists():
        raise InputError("no such file or folder", path=only)
    base = base_path_for(only)
    if base is None:
        raise InputError(
            "one path given, and it names no local base model",
            path=only,
            hint=f"usage: {PROG} BASE TUNED [TUNED ...]",
        )
    return base, [only]


def _run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")  # a command-line run never opens a window
    import torch

    from .. import names as nm
    from ..analysis import analyze, summarize
    from ..checkpoints import open_checkpoint
    from ..errors import InputError

    base, tuned = _resolve_paths(args.paths)
    if args.last is not None and args.last < 1:
        raise InputError("--last must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but torch sees no CUDA device", hint="use --device cpu")

    if args.list:
        store = open_checkpoint(base)
        shapes = {k: store.shape(k) for k in store.keys()}
        for name in nm.select(shapes, args.modules, include_all=args.all_modules):
            print(f"{name}\t{list(shapes[name])}")
        return 0

    layers = analyze(
        base,
        tuned,
        modules=args.modules,
        all_modules=args.all_modules,
        method=args.method,
        axis=args.axis,
        steps=_parse_steps(args.steps),
        last=args.last,
        device=args.device,
        dora_scale_axis=args.dora_scale_axis,
        progress=False if args.quiet else None,
    )
    summary = summarize(layers)
    if not args.quiet:
        print(format_summary(summary))
        print()
        print(format_layers(layers))
    if args.out is not None:
        from ..outputs import write_outputs

        written = write_outputs(args.out, layers, summary, fmt=args.format, plots=not args.no_plots)
        if not args.quiet:
            print(f"\nwrote {len(written)} files to {args.out}/ (report: {args.out / 'report.md'})")
    return _check_sign(summary, args.expect_sign)


def _check_sign(summary: pd.DataFrame, expect: str | None) -> int:
    """Exit status for ``--expect-sign``: 1 with a one-line reason per failing run."""
    from ..stats import has_sign

    if expect is None:
        return 0
    failed = 0
    for _, row in summary[summary["kind"] == "all"].iterrows():
        r = row["pearson_r"]
        if not has_sign(r, +1 if expect == "positive" else -1):
            failed += 1
            print(f"{PROG}: sign check failed: run {row['run']}: pearson r = {r:+.3f} over {row['n']} points, expected {expect}", file=sys.stderr)
    return 1 if failed else 0


def format_summary(summary: pd.DataFrame) -> str:
    """The summary as a readable table: r, its interval, rho, slope, n per run and kind."""
    from ..stats import strength

    t = summary.copy()
    t["r"] = t["pearson_r"].map(lambda v: f"{v:+.3f}" if math.isfinite(v) else "n/a")
    t["95% CI"] = [
        f"[{lo:+.2f}, {hi:+.2f}]" if math.isfinite(lo) else "" for lo, hi in zip(t["r_ci_low"], t["r_ci_high"])
    ]
    t["rho"] = t["spearman_rho"].map(lambda v: f"{v:+.3f}" if math.isfinite(v) else "n/a")
    t["within / between"] = [
        f"{_fmt(w)} / {_fmt(b)}" for w, b in zip(t["r_within"], t["r_between"])
    ]
    t["slope"] = t["slope"].map(lambda v: f"{v:.3g}" if math.isfinite(v) else "n/a")
    t["reading"] = t["pearson_r"].map(strength)
    cols = ["run", "method", "kind", "n", "r", "95% CI", "rho", "within / between", "slope", "reading"]
    return "dM vs dD correlation (Pearson r over matrices x checkpoints)\n" + t[cols].to_string(index=False)


def _fmt(v: float) -> str:
    return f"{v:+.2f}" if math.isfinite(v) else "n/a"


def format_layers(layers: pd.DataFrame, *, max_rows: int = 60) -> str:
    """Per-layer dD / dM at each run's last step, one column per matrix kind."""
    last = layers[layers["step"] == layers.groupby("run")["step"].transform("max")]
    cell = last.assign(v=[f"{d:.3g} / {m:.3g}" for d, m in zip(last["delta_d"], last["delta_m"])])
    table = cell.pivot_table(index=["run", "step", "layer"], columns="kind", values="v", aggfunc="first", dropna=False)
    table = table.dropna(how="all")
    text = table.to_string(na_rep="")
    lines = text.splitlines()
    if len(lines) > max_rows:
        lines = lines[:max_rows] + [f"... ({len(lines) - max_rows} more lines in layers.csv)"]
    return "dD / dM per layer at each run's last step\n" + "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
