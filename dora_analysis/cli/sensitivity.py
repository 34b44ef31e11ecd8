"""``dora-sensitivity``: how robust is the reproduced sign pattern? One change at a time.

    dora-sensitivity --out runs/sensitivity [--seeds 0 1 2]
    python -m dora_analysis.cli.sensitivity --out runs/sensitivity

Thin by design: parse, call :func:`dora_analysis.experiments.sensitivity.measure`, print its
Markdown table (docs/reproduction.md holds the output). Finished runs are reused, so an
interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..console import run_main
from ..experiments.reproduction import REFERENCE

PROG = "dora-sensitivity"


def build_parser() -> argparse.ArgumentParser:
    """The ``dora-sensitivity`` argument parser."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train the reproduction's runs and variants of them (weight decay, the task's words), "
        "then print the pooled Pearson r of every run under each variant of the analysis "
        "(which checkpoints, which axis) as a Markdown table.",
        epilog="The variants: dora_analysis/experiments/sensitivity.py. About 15 min on 2 CPU cores; finished runs are reused.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("runs/sensitivity"), help="output folder (default runs/sensitivity)")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=list(REFERENCE.seeds), help=f"seeds (default {' '.join(map(str, REFERENCE.seeds))})"
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dora-sensitivity``; returns the exit status."""
    args = build_parser().parse_args(argv)
    seeds = tuple(args.seeds)

    def body() -> int:
        from ..experiments.sensitivity import format_table, measure

        print(format_table(measure(args.out, seeds, progress=not args.quiet), seeds))
        return 0

    return run_main(PROG, body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
