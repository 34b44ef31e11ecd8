"""``dora-reproduce``: the paper's figure 2 (FT vs LoRA vs DoRA) from scratch, on a laptop.

Thin by design: parse, call :func:`dora_analysis.experiments.reproduction.reproduce`, print the
measured correlations beside the paper's, exit 1 if a sign differs. pandas and torch are
imported after parsing, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..console import run_main
from ..experiments.reproduction import REFERENCE

PROG = "dora-reproduce"


def build_parser() -> argparse.ArgumentParser:
    """The ``dora-reproduce`` argument parser."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Reproduce the DoRA paper's figure 2 (FT / LoRA / DoRA magnitude-vs-direction "
        "correlations) with the built-in trainer on all-MiniLM-L6-v2, then check the sign pattern.",
        epilog="The reference configuration and why: dora_analysis/experiments/reproduction.py (Reference), "
        "dora_analysis/train/config.py (TrainConfig), docs/reproduction.md.\n"
        "exit status: 0 signs as in the paper, 1 a sign differs, 2 bad input.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("runs/reproduce"), help="output folder (default runs/reproduce)")
    p.add_argument("--seeds", type=int, nargs="+", help=f"seeds (default {' '.join(map(str, REFERENCE.seeds))})")
    p.add_argument("--quick", action="store_true", help="one seed (0) only: ~a third of the time")
    p.add_argument("--no-plots", action="store_true", help="skip figures")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dora-reproduce``; returns the exit status."""
    args = build_parser().parse_args(argv)
    seeds = (0,) if args.quick else tuple(args.seeds) if args.seeds else None
    import matplotlib

    matplotlib.use("Agg")  # a command-line run never opens a window
    return run_main(
        PROG,
        lambda: _run(args, seeds),
        debug=args.debug,
        on_interrupt="interrupted (rerun to continue: finished runs are reused)",
    )


def _run(args: argparse.Namespace, seeds: tuple[int, ...] | None) -> int:
    from ..experiments.reproduction import (
        SIGNS_FILE,
        SPECTRAL_DIR,
        format_comparison,
        format_intruders,
        format_sign_table,
        intruder_table,
        reproduce,
    )

    t0 = time.perf_counter()
    result = reproduce(args.out, seeds=seeds, plots=not args.no_plots, progress=not args.quiet)
    print(format_comparison(result.summary))
    if result.signs is not None:
        print(f"\nSigns over seeds (permutation test over the 6 matrices: {result.out / SIGNS_FILE})")
        print(format_sign_table(result.signs))
    if result.spectral is not None:
        print(f"\nIntruder dimensions (top 10, eps 0.5) and dW's spectrum at the last checkpoint: {result.out / SPECTRAL_DIR}/")
        print(format_intruders(intruder_table(result.spectral)))
    print(f"\n{len(result.layers)} points; report: {result.out / 'report.md'}; figure: {result.out / 'figures'}/ "
          f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    for line in result.failures:
        print(f"{PROG}: sign differs from the paper: {line}", file=sys.stderr)
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
