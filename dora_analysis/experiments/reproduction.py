"""The paper's figure 2 (FT vs LoRA vs DoRA) reproduced from scratch, on a laptop.

Trains the reference runs with the built-in trainer on the real all-MiniLM-L6-v2, analyses
them the way figure 2 is drawn (query matrices of every layer at the last 4 checkpoints,
Pearson r over the points), writes figures and a report, and checks the paper's sign
pattern: FT r < 0, LoRA r > 0, DoRA r < 0.

The training settings are :class:`~dora_analysis.train.config.TrainConfig`'s defaults, each
with its reason there; :data:`REFERENCE` adds what is not a training setting (methods, seeds,
which matrices and checkpoints are analysed) and any departure from those defaults.

Example:
    >>> from dora_analysis.experiments.reproduction import reproduce
    >>> result = reproduce("runs/reproduce", seeds=(0,))
    >>> result.failures        # [] when every run has the paper's sign
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..paper import EXPECTED_SIGN, METHOD_ORDER, PAPER_R
from ..train.config import DEFAULT_LR, TrainConfig

if TYPE_CHECKING:
    import pandas as pd

# TrainConfig's defaults, which the reference trains with unless ``Reference.training`` says otherwise.
_TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


@dataclass(frozen=True)
class Reference:
    """The reproduction's configuration, with the reason for every value.

    Training settings read through to the run's :class:`TrainConfig`: ``REFERENCE.weight_decay``
    is the decay the reference trains with (TrainConfig's default unless ``training`` changes
    it).
    """

    methods: tuple[str, ...] = METHOD_ORDER
    # The three methods figure 2 compares, in its order.
    seeds: tuple[int, ...] = (0, 1, 2)
    # Three seeds: the FT and DoRA r move by +-0.3 between seeds (docs/reproduction.md), so one
    # seed says little; every default seed must show the paper's signs.
    snapshots: tuple[int, ...] = (195, 210, 225, 240)
    # Figure 2 uses 4 checkpoints (3 intermediate + final). The last 4 of 16 (every 15 steps)
    # give the paper's signs; evenly spread ones (60..240) make every method positive, because
    # the within-layer growth of dM and dD over training then dominates (docs/reproduction.md).
    # Only these are saved: FT snapshots are ~90 MB each.
    modules: str = r"attention\.self\.query$"
    # Figure 2 shows the query matrices of every layer (value matrices: the paper's figure 7).
    training: dict[str, Any] = field(default_factory=dict)
    # TrainConfig fields that differ from their defaults. None for the reference: the trainer's
    # defaults were chosen for it (dora_analysis/train/config.py says why each has its value);
    # the sensitivity study's variants set some.

    def __getattr__(self, name: str) -> Any:
        # Called only for names that are not fields: a training setting, as the runs use it.
        if name not in _TRAIN_DEFAULTS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return self.__dict__.get("training", {}).get(name, _TRAIN_DEFAULTS[name])

    @property
    def lr_ft(self) -> float:
        """The learning rate of the FT runs."""
        return self.train_config("ft", 0, Path(".")).learning_rate

    @property
    def lr_adapter(self) -> float:
        """The learning rate of the LoRA and DoRA runs."""
        return self.train_config("lora", 0, Path(".")).learning_rate

    def with_training(self, **changes: Any) -> Reference:
        """This reference with some training settings changed, e.g. ``with_training(weight_decay=0.01)``."""
        return dataclasses.replace(self, training={**self.training, **changes})

    def train_config(self, method: str, seed: int, out: Path, *, progress: bool = True) -> TrainConfig:
        """The trainer configuration of one reference run."""
        # lr is spelled out, not left None, though the value is the method's default: each run
        # folder's run_config.json records lr as given, and the reference's folders (figures/
        # was made from them) hold the number; a None here would make a finished run look like
        # a different one, refused instead of reused.
        settings = {"lr": DEFAULT_LR[method], **self.training}
        return TrainConfig(
            method=method,  # type: ignore[arg-type]
            out=out,
            seed=seed,
            save_steps=self.snapshots,
            save_every=0,
            resume=True,  # a finished run is reused, an interrupted one continues
            progress=progress,
            **settings,
        )


REFERENCE = Reference()


@dataclass
class Reproduction:
    """What a reproduction produced."""

    layers: pd.DataFrame
    summary: pd.DataFrame
    failures: list[str]
    out: Path
    # The same runs, matrices and checkpoints through the spectral metrics (``spectrum``,
    # ``intruders``): written to ``out/spectral/``, beside (not into) figure 2's files.
    spectral: pd.DataFrame | None = None
    # Per run: the pooled r, its permutation p over matrices, and whether it has the paper's
    # sign (:func:`sign_table`); written to ``out/signs.csv``.
    signs: pd.DataFrame | None = None


def run_name(method: str, seed: int) -> str:
    """A run's folder name under ``runs/`` and its name in the tables: ``dora-seed0``."""
    return f"{method}-seed{seed}"


def train_runs(ref: Reference, out: Path, seeds: tuple[int, ...], *, progress: bool = True) -> list[Path]:
    """Train (or reuse) every reference run; returns their folders in seed, method order."""
    from ..train import train

    runs = []
    for seed in seeds:
        for method in ref.methods:
            run_dir = out / "runs" / run_name(method, seed)
            config = ref.train_config(method, seed, run_dir, progress=progress)
            t0 = time.perf_counter()
            result = train(config)
            if progress:
                how = "reused" if result.resumed_from == config.steps else "trained"
                print(
                    f"{run_name(method, seed)}: {how} in {time.perf_counter() - t0:.0f} s, final loss {result.final_loss:.3f}",
                    file=sys.stderr,
                )
            runs.append(run_dir)
    return runs


# The second finding checked on the same runs (Shuttleworth et al. 2024): intruder dimensions
# and the spectrum of dW. No extra training; written to ``out/spectral/`` so that figure 2's
# layers.csv and summary.csv stay exactly as they were.
SPECTRAL_METRICS: tuple[str, ...] = ("spectrum", "intruders")
SPECTRAL_DIR = "spectral"


def intruder_table(spectral: pd.DataFrame) -> pd.DataFrame:
    """Per run, at its last checkpoint: the mean intruder count per matrix, the share of
    matrices with one or more, the smallest similarity, and dW's mean stable and effective rank.

    Args:
        spectral: :func:`~dora_analysis.analyze`'s frame with the ``spectrum`` and
            ``intruders`` columns.

    Returns:
        One row per run, in the frame's order: ``run``, ``method``, ``step``, ``intruders``,
        ``with_intruders``, ``min_sim``, ``stable_rank``, ``effective_rank``.
    """
    last = spectral[spectral["step"] == spectral.groupby("run")["step"].transform("max")]
    grouped = last.groupby(["run", "method"], sort=False)
    table = grouped.agg(
        step=("step", "max"),
        intruders=("intruders", "mean"),
        with_intruders=("intruders", lambda c: float((c > 0).mean())),
        min_sim=("intruder_min_sim", "min"),
        stable_rank=("dw_stable_rank", "mean"),
        effective_rank=("dw_effective_rank", "mean"),
    )
    return table.reset_index()


def format_intruders(table: pd.DataFrame) -> str:
    """:func:`intruder_table` as plain text, one line per run."""
    lines = [f"{'run':12s} {'intruders/matrix':>16s} {'with any':>9s} {'min sim':>8s} {'dW stable rank':>15s} {'effective rank':>15s}"]
    for row in table.itertuples():
        lines.append(
            f"{row.run:12s} {row.intruders:16.2f} {row.with_intruders:9.0%} {row.min_sim:8.3f} {row.stable_rank:15.2f} {row.effective_rank:15.1f}"
        )
    return "\n".join(lines)


SIGNS_FILE = "signs.csv"
# A run's sign counts as "clear" when the permutation test over its 6 matrices rejects r = 0 at this level.
SIGN_LEVEL = 0.05


def sign_table(layers: pd.DataFrame) -> pd.DataFrame:
    """Per run: the pooled r of dM against dD, the permutation p over matrices
    (:func:`dora_analysis.summary.permutation_summary`: every pairing of the 6 matrices'
    trajectories, exact), and whether r has the paper's sign, and does so with p < 0.05.

    Returns:
        ``run``, ``method``, ``seed``, ``pearson_r``, ``r_perm_p``, ``paper_sign``, ``clear``.
    """
    import pandas as pd

    from ..stats import has_sign
    from ..summary import permutation_summary

    pooled = permutation_summary(layers).query("kind == 'all'").reset_index(drop=True)
    seeds = pooled["run"].str.extract(r"seed(\d+)$", expand=False)
    paper_sign = [has_sign(r, EXPECTED_SIGN.get(str(m), 0)) for r, m in zip(pooled["pearson_r"], pooled["method"], strict=True)]
    return pooled.assign(
        seed=pd.to_numeric(seeds, errors="coerce").astype("Int64"),
        paper_sign=paper_sign,
        clear=[ok and p < SIGN_LEVEL for ok, p in zip(paper_sign, pooled["r_perm_p"], strict=True)],
    )[["run", "method", "seed", "pearson_r", "r_perm_p", "paper_sign", "clear"]]


def format_sign_table(signs: pd.DataFrame) -> str:
    """Per method: in how many seeds r has the paper's sign, and with permutation p < 0.05."""
    lines = [f"{'method':8s} {'paper':>6s} {'seeds with the sign':>20s} {'and p < 0.05':>13s}  r per seed"]
    for method, rows in signs.groupby("method", sort=False):
        n = len(rows)
        rs = " ".join(f"{r:+.2f}" for r in rows["pearson_r"])
        lines.append(
            f"{method:8s} {PAPER_R.get(str(method), math.nan):+6.2f} {f'{int(rows.paper_sign.sum())} / {n}':>20s} {f'{int(rows.clear.sum())} / {n}':>13s}  {rs}"
        )
    return "\n".join(lines)


def sign_failures(summary: pd.DataFrame, expected: dict[str, int] = EXPECTED_SIGN) -> list[str]:
    """One line per run whose pooled r does not have the paper's sign."""
    from ..stats import has_sign  # scipy: not at import, so that --help stays instant

    failures = []
    for _, row in summary[summary["kind"] == "all"].iterrows():
        want = expected.get(str(row["method"]))
        r = float(row["pearson_r"])
        if want is not None and not has_sign(r, want):
            failures.append(f"{row['run']}: r = {r:+.3f}, the paper's sign is {'positive' if want > 0 else 'negative'}")
    return failures


def reproduce(
    out: str | Path,
    *,
    seeds: tuple[int, ...] | None = None,
    ref: Reference = REFERENCE,
    plots: bool = True,
    progress: bool = True,
) -> Reproduction:
    """Train the reference runs, analyse them as figure 2, write figures and a report.

    Args:
        out: Output folder: ``runs/`` (the trained runs), ``layers.csv``, ``summary.csv``,
            ``summary.json``, ``figures/``, ``report.md``, ``report.html``; and
            ``spectral/`` with the same files for :data:`SPECTRAL_METRICS` (and ``pairs.csv``);
            ``signs.csv`` (:func:`sign_table`).
        seeds: Seeds to run (default: ``ref.seeds``).
        ref: The configuration (default: :data:`REFERENCE`).
        plots: Draw figures.
        progress: Progress bars and per-run lines on stderr.

    Returns:
        The analysis, its summary, and the sign checks that failed (empty if all hold).
    """
    from .. import analyze, summarize
    from ..outputs import write_outputs
    from ..train import default_model_path

    out = Path(out)
    seeds = tuple(ref.seeds if seeds is None else seeds)
    run_dirs = train_runs(ref, out, seeds, progress=progress)
    layers = analyze(ref.model or default_model_path(), run_dirs, modules=ref.modules, steps=ref.snapshots, progress=progress)
    summary = summarize(layers)
    write_outputs(
        out, layers, summary, plots=plots, paper=PAPER_R,
        title="DoRA figure 2, reproduced: all-MiniLM-L6-v2 on the built-in task",
    )  # fmt: skip
    # The same matrices and checkpoints through the spectral metrics, in a folder of their own.
    spectral = analyze(
        ref.model or default_model_path(), run_dirs, modules=ref.modules, steps=ref.snapshots,
        metrics=list(SPECTRAL_METRICS), progress=progress,
    )  # fmt: skip
    write_outputs(
        out / SPECTRAL_DIR, spectral, summarize(spectral), plots=plots,
        title="Intruder dimensions and the spectrum of dW: the reproduction's FT / LoRA / DoRA runs",
    )  # fmt: skip
    signs = sign_table(layers)
    signs.to_csv(out / SIGNS_FILE, index=False)
    return Reproduction(layers=layers, summary=summary, failures=sign_failures(summary), out=out, spectral=spectral, signs=signs)


def format_comparison(summary: pd.DataFrame, paper: dict[str, float] = PAPER_R) -> str:
    """Measured r per method (each seed, and their mean) next to the paper's."""
    from ..stats import has_sign

    pooled = summary[summary["kind"] == "all"]
    lines = [f"{'method':8s} {'paper r':>8s} {'measured r (per seed)':>28s} {'mean':>7s}  sign"]
    for method, rows in pooled.groupby("method", sort=False):
        rs = rows["pearson_r"].to_list()
        want = EXPECTED_SIGN.get(str(method), 0)
        ok = all(has_sign(r, want) for r in rs)
        per_seed = " ".join(f"{r:+.2f}" for r in rs)
        lines.append(
            f"{method:8s} {paper.get(str(method), math.nan):+8.2f} {per_seed:>28s} {sum(rs) / len(rs):+7.2f}  {'as paper' if ok else 'DIFFERS'}"
        )
    return "\n".join(lines)
