"""Writing an analysis to its output folder, all or nothing: the tables, the JSON, the report.

Shared by every command that writes results (``dora-analyze --out``, ``dora-reproduce``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd


def write_outputs(
    out: Path,
    layers: pd.DataFrame,
    summary: pd.DataFrame,
    *,
    fmt: str = "png",
    plots: bool = True,
    paper: dict[str, float] | None = None,
    title: str | None = None,
) -> list[Path]:
    """Write every output into ``out``, all or nothing.

    Files: ``layers.csv``, ``summary.csv``, ``summary.json``, and the report
    (:func:`dora_analysis.report.write_report`: ``report.md``, ``report.html``, ``figures/``).

    Everything is first written to a staging folder beside ``out``; only when all of it is
    there is each entry renamed into place, so a failure never leaves half-written files.
    """
    from .analysis import subspace_pairs
    from .report import write_report

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        layers.to_csv(staging / "layers.csv", index=False)
        summary.to_csv(staging / "summary.csv", index=False)
        pairs = subspace_pairs(layers)
        if len(pairs):
            # Subspace similarity between tuned versions, when the walk computed it (spectrum metric).
            pairs.to_csv(staging / "pairs.csv", index=False)
        records = json.loads(summary.to_json(orient="records"))
        (staging / "summary.json").write_text(json.dumps({"runs": records}, indent=2) + "\n")
        write_report(staging, layers, summary, fmt=fmt, plots=plots, paper=paper, title=title)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for entry in sorted(staging.iterdir()):
            target = out / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
            written.extend([target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file()))
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
