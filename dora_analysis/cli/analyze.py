"""``dora-analyze``: magnitude / direction analysis of fine-tuned checkpoints from the shell.

Thin by design: parse, call :func:`dora_analysis.analyze` and :func:`dora_analysis.summarize`,
print tables, write files. Heavy imports (torch, pandas) happen after parsing so ``--help`` is
instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
  dora-analyze base/ runs/dora --watch --out report/       # each checkpoint as training writes it

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
    p.add_argument("paths", nargs="*", metavar="PATH", help="BASE then TUNED [TUNED ...]; or one adapter that names its base")
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
    sel.add_argument(
        "--metrics",
        metavar="NAME[,NAME]",
        default="md",
        help="what to measure (default md: magnitude / direction); --list-metrics shows every metric",
    )
    sel.add_argument(
        "--layout",
        choices=("linear", "conv1d"),
        help="how GPT-2-style matrices (c_attn, c_proj, c_fc) are stored when the base has no config.json to say: "
        "'linear' [out, in] (torch Linear, e.g. GPTBigCode) or 'conv1d' [in, out] (GPT-2 Conv1D); wins over any guess",
    )
    sel.add_argument(
        "--dora-scale-axis", choices=("out", "in"), help="kohya/LyCORIS dora_scale axis when the shape cannot tell (square matrices)"
    )
    sel.add_argument(
        "--intruder-k",
        type=int,
        default=10,
        metavar="K",
        help="intruders metric: top singular vectors of W_t examined (default 10, PEFT's top_k)",
    )
    sel.add_argument(
        "--intruder-eps",
        type=float,
        default=0.5,
        metavar="EPS",
        help="intruders metric: |cos| below which a vector is an intruder (default 0.5, PEFT's threshold_epsilon)",
    )
    sel.add_argument(
        "--rank",
        type=int,
        default=8,
        metavar="R",
        help="spectrum / amplification: dW's top-r directions when the update's rank is unknown (full fine-tuning; default 8)",
    )
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, metavar="DIR", help="write layers.csv, summary.csv, summary.json, figures/ and report.md there")
    out.add_argument("--format", choices=("png", "svg", "pdf"), default="png", help="figure format (default png)")
    out.add_argument("--no-plots", action="store_true", help="skip figures (and their links in the report)")
    out.add_argument("--expect-sign", choices=("positive", "negative"), help="exit 1 if a run's pooled Pearson r has the other sign")
    out.add_argument("--list", action="store_true", help="list the base's tensors that would be analysed, then exit")
    out.add_argument("--list-metrics", action="store_true", help="list the metrics and their columns, then exit")
    out.add_argument("--quiet", action="store_true", help="no progress bar, no tables")
    out.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute everything; by default results are stored in DIR/.cache and a rerun measures only new checkpoints",
    )
    out.add_argument(
        "--watch",
        action="store_true",
        help="keep polling the TUNED run folders and analyse each checkpoint once it is complete, rewriting --out DIR "
        "after each; stop with Ctrl-C",
    )
    out.add_argument("--until-step", type=int, metavar="N", help="with --watch: stop once every run has a checkpoint at step N or later")
    out.add_argument(
        "--poll", type=float, default=5.0, metavar="SECONDS", help="with --watch: seconds between looks at the run folders (default 5)"
    )
    run = p.add_argument_group("running")
    run.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    run.add_argument(
        "--engine",
        default="serial",
        help="where the tasks (one per base matrix) run: serial (default, this process) or ray (pip install 'dora-analysis[ray]')",
    )
    run.add_argument("--address", metavar="ADDR", help="with --engine ray: join this Ray cluster ('auto': the one on this machine)")
    run.add_argument(
        "--workers", type=int, metavar="N", help="with --engine ray: start a local Ray cluster with N workers (default: all cores)"
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (tasks, bytes read and peak memory per task, total bytes) from headers alone, then exit",
    )
    run.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dora-analyze``; returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: _run(args), debug=args.debug, standalone=argv is None)


def _parse_steps(text: str | None) -> list[int] | None:
    from ..errors import InputError

    if text is None:
        return None
    try:
        return [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise InputError(f"--steps takes comma-separated integers, got {text!r}") from None


def _check_input_path(given: str) -> None:
    """A path the system cannot even look up (too long, a symlink loop, no permission) is named here."""
    import errno
    import os

    from ..errors import InputError

    try:
        os.stat(given)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return  # said later, with the context of what was expected there
        shown = given if len(given) <= 120 else given[:100] + "..."
        raise InputError(f"cannot look up this path ({exc.strerror})", path=shown) from None
    except ValueError as exc:  # an embedded NUL byte
        raise InputError(f"not a usable path ({exc})", path=repr(given)[:120]) from None


def _check_device(device: str, torch: object) -> None:
    """``--device``: cpu, cuda or cuda:N for a GPU torch sees; anything else is named."""
    from ..errors import InputError

    try:
        dev = torch.device(device)  # type: ignore[attr-defined]
    except (RuntimeError, ValueError):
        raise InputError(f"unknown --device {device!r}", hint="use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise InputError(f"--device {device!r} is not supported", hint="use cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0  # type: ignore[attr-defined]
    if count == 0:
        raise InputError(f"--device {device} asked for, but torch sees no CUDA device", hint="use --device cpu")
    if dev.index is not None and dev.index >= count:
        raise InputError(f"--device {device}: torch sees {count} CUDA device(s)", hint=f"use cuda:0 to cuda:{count - 1}")


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

    from ..analysis import analyze, select_modules
    from ..containers import open_checkpoint
    from ..errors import InputError
    from ..summary import summarize
    from ..tables import format_layers, format_summary

    if args.list_metrics:
        print(_describe_metrics())
        return 0
    if not args.paths:
        raise InputError(f"no paths given (usage: {PROG} BASE TUNED [TUNED ...]; {PROG} --help)")
    for given in args.paths:
        _check_input_path(given)
    if args.out is not None and not args.list:
        from ..outputs import check_out

        check_out(args.out)  # before any work: a bad --out costs nothing
    _check_device(args.device, torch)
    select_modules({}, args.modules)  # a bad --modules regex is named before any file is read
    base, tuned = _resolve_paths(args.paths)
    if args.last is not None and args.last < 1:
        raise InputError("--last must be at least 1")

    if args.dry_run:
        from ..dryrun import describe_plan

        print(
            describe_plan(base, tuned, modules=args.modules, all_modules=args.all_modules, steps=_parse_steps(args.steps), last=args.last)
        )
        return 0
    if args.list:
        store = open_checkpoint(base)
        shapes = {k: store.shape(k) for k in store.keys()}
        for name in select_modules(shapes, args.modules, include_all=args.all_modules):
            print(f"{name}\t{list(shapes[name])}")
        return 0

    if args.until_step is not None and not args.watch:
        raise InputError("--until-step goes with --watch")
    if args.watch:
        return _watch(args, base, tuned)

    from ..cache import held_writes

    # New cache entries land in --out only once the outputs have: all or nothing, cache included.
    with held_writes() as commit_cache:
        layers = analyze(
            base,
            tuned,
            progress=False if args.quiet else None,
            cache=None if args.out is None or args.no_cache else args.out / ".cache",
            **_analyze_options(args),
        )
        summary = summarize(layers)
        _note_undefined_direction(layers)
        if not args.quiet:
            print(format_summary(summary))
            print()
            print(format_layers(layers))
        if args.out is not None:
            from ..outputs import write_outputs

            written = write_outputs(args.out, layers, summary, fmt=args.format, plots=not args.no_plots)
            commit_cache()
            if not args.quiet:
                print(f"\nwrote {len(written)} files to {args.out}/ (report: {args.out / 'report.md'})")
    return _check_sign(summary, args.expect_sign)


def _note_undefined_direction(layers: pd.DataFrame) -> None:
    """Say which points have no dD (all vectors zero on a side), since the correlation leaves them out."""
    if "delta_d" not in layers.columns:
        return
    missing = layers[layers["delta_d"].isna()]
    if len(missing):
        names = ", ".join(sorted(set(missing["module"].astype(str))))
        print(
            f"{PROG}: note: {len(missing)} point(s) have no direction (every vector is zero in the base or the tuned "
            f"matrix): dD is left empty and the correlation's n leaves them out: {names}",
            file=sys.stderr,
        )


def _analyze_options(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of :func:`dora_analysis.analyze` that the one-shot and the ``--watch`` paths share.

    Built once, so a watched analysis measures exactly what the one-shot command would;
    only the progress bar and the cache (a folder here, a switch for ``watch``) differ.
    """
    return {
        "modules": args.modules,
        "all_modules": args.all_modules,
        "method": args.method,
        "axis": args.axis,
        "steps": _parse_steps(args.steps),
        "last": args.last,
        "device": args.device,
        "metrics": [m.strip() for m in args.metrics.split(",") if m.strip()],
        "metric_options": {"intruder_k": args.intruder_k, "intruder_eps": args.intruder_eps, "rank": args.rank},
        "reader_options": {} if args.dora_scale_axis is None else {"dora_axis": args.dora_scale_axis},
        "layout": args.layout,
        "engine": args.engine,
        "engine_options": _engine_options(args),
    }


def _engine_options(args: argparse.Namespace) -> dict[str, object]:
    """``--address`` / ``--workers`` for the engine; they mean nothing to the serial one."""
    from ..errors import InputError

    options = {k: v for k, v in (("address", args.address), ("workers", args.workers)) if v is not None}
    if options and args.engine == "serial":
        raise InputError(f"--{next(iter(options))} applies to --engine ray", hint="add --engine ray")
    return options


def _watch(args: argparse.Namespace, base: Path, tuned: list[Path]) -> int:
    """``--watch``: analyse each checkpoint once it is complete, rewriting --out after each."""
    from ..errors import InputError
    from ..watch import watch

    if args.out is None:
        raise InputError("--watch rewrites its results in --out DIR after each checkpoint; give one")

    def report(layers: pd.DataFrame, summary: pd.DataFrame) -> None:
        if not args.quiet:
            last = {run: int(part["step"].max()) for run, part in layers.groupby("run", sort=False)}
            print(f"{PROG}: {', '.join(f'{r} at step {s}' for r, s in last.items())}; wrote {args.out}/", flush=True)

    if not args.quiet:
        print(f"{PROG}: watching {', '.join(map(str, tuned))} (Ctrl-C stops)", flush=True)
    watch(
        base,
        tuned,
        args.out,
        until_step=args.until_step,
        poll=args.poll,
        cache=not args.no_cache,
        plots=not args.no_plots,
        fmt=args.format,
        on_update=report,
        **_analyze_options(args),
    )
    return 0


def _describe_metrics() -> str:
    """Every registered metric: its name, title, and columns with their descriptions."""
    from ..metrics import METRICS, build_metrics

    lines = []
    for metric in build_metrics(METRICS.names()):
        lines.append(f"{metric.name}: {metric.title}")
        lines += [f"    {c.name:18s} {c.description}" for c in (*metric.columns, *metric.summary_columns)]
    return "\n".join(lines)


def _check_sign(summary: pd.DataFrame, expect: str | None) -> int:
    """Exit status for ``--expect-sign``: 1 with a one-line reason per failing run."""
    from ..errors import InputError
    from ..stats import has_sign

    if expect is None:
        return 0
    if "pearson_r" not in summary.columns:
        raise InputError("--expect-sign checks the md metric's correlation; add md to --metrics")
    failed = 0
    for _, row in summary[summary["kind"] == "all"].iterrows():
        r = row["pearson_r"]
        if not has_sign(r, +1 if expect == "positive" else -1):
            failed += 1
            print(
                f"{PROG}: sign check failed: run {row['run']}: pearson r = {r:+.3f} over {row['n']} points, expected {expect}",
                file=sys.stderr,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
