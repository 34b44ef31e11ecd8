"""How robust is the reproduced sign pattern? Vary one choice of the reference at a time.

Trains the reference runs with a snapshot every 15 steps, and variants of the reference
(weight decay, the synthetic task's words), then measures the pooled Pearson r of every run
under each variant of the analysis (which checkpoints, which axis). :func:`format_table`
makes a Markdown table with one row per variant; docs/reproduction.md holds its output.
Finished runs are reused, so an interrupted study continues where it stopped.

Example:
    >>> rows = measure(Path("runs/sensitivity"), seeds=(0, 1, 2))
    >>> print(format_table(rows, (0, 1, 2)))
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..paper import EXPECTED_SIGN, PAPER_R, method_label
from .reproduction import REFERENCE, Reference, train_runs

EVERY_15 = tuple(range(15, 241, 15))


@dataclass(frozen=True)
class Variant:
    """One row of the table: runs trained with ``ref``, analysed at ``steps`` along ``axis``."""

    name: str
    ref: Reference
    steps: tuple[int, ...] = REFERENCE.snapshots
    axis: str = "out"
    runs_dir: str = "every15"
    note: str = field(default="", compare=False)


def variants() -> list[Variant]:
    """The reference, then one change at a time."""
    every15 = replace(REFERENCE, snapshots=EVERY_15)
    return [
        Variant("reference: last 4 of 16 checkpoints (195-240)", every15, note="as `dora-reproduce`"),
        Variant("checkpoints 150, 180, 210, 240", every15, steps=(150, 180, 210, 240)),
        Variant("checkpoints 60, 120, 180, 240 (evenly spread)", every15, steps=(60, 120, 180, 240)),
        Variant("all 16 checkpoints", every15, steps=EVERY_15),
        Variant("vectors = input columns (`--axis in`)", every15, axis="in"),
        Variant("weight decay 0.01", REFERENCE.with_training(weight_decay=0.01), runs_dir="wd0.01"),
        Variant("weight decay 0", REFERENCE.with_training(weight_decay=0.0), runs_dir="wd0"),
        Variant("everyday adjectives (`synthetic_words=common`)", REFERENCE.with_training(synthetic_words="common"), runs_dir="common"),
    ]


def measure(out: Path, seeds: tuple[int, ...], *, progress: bool = True) -> list[tuple[Variant, dict[str, list[float]]]]:
    """Pooled r per method (one value per seed) for every variant."""
    from .. import analyze, summarize
    from ..train import default_model_path

    base = default_model_path()
    # Several variants only re-analyse the same runs: train (or check) each set of runs once.
    trained: dict[str, list[Path]] = {}
    rows = []
    for v in variants():
        t0 = time.perf_counter()
        if v.runs_dir not in trained:
            trained[v.runs_dir] = train_runs(v.ref, out / v.runs_dir, seeds, progress=progress)
        run_dirs = trained[v.runs_dir]
        layers = analyze(base, run_dirs, modules=v.ref.modules, steps=v.steps, axis=v.axis, progress=False)  # type: ignore[arg-type]
        pooled = summarize(layers, n_boot=0).query("kind == 'all'")
        by_method = {m: part["pearson_r"].to_list() for m, part in pooled.groupby("method", sort=False)}
        rows.append((v, by_method))
        if progress:
            print(f"{v.name}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return rows


def format_table(rows: list[tuple[Variant, dict[str, list[float]]]], seeds: tuple[int, ...]) -> str:
    """A Markdown table: per method, r for each seed; a check where the paper's sign holds on every seed."""
    from ..stats import has_sign

    methods = list(REFERENCE.methods)
    head = (
        "| variant | " + " | ".join(f"{method_label(m)} r (paper {PAPER_R[m]:+.2f})" for m in methods) + " | paper's signs on every seed |"
    )
    lines = [f"Pearson r of dM vs dD, query matrices, seeds {' / '.join(map(str, seeds))}", "", head, "|" + "---|" * (len(methods) + 2)]
    for v, by_method in rows:
        cells, all_ok = [], True
        for m in methods:
            rs = by_method.get(m, [])
            ok = bool(rs) and all(has_sign(r, EXPECTED_SIGN[m]) for r in rs)
            all_ok &= ok
            cells.append(" / ".join(f"{r:+.2f}" for r in rs))
        lines.append(f"| {v.name} | " + " | ".join(cells) + f" | {'yes' if all_ok else 'no'} |")
    return "\n".join(lines)
