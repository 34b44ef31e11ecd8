"""The analyzer end to end on tiny transformers checkpoints, against an independent oracle."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import dora_analysis as da
from dora_analysis.analysis import LAYER_COLUMNS
from dora_analysis.cli.analyze import main
from dora_analysis.containers import open_checkpoint
from dora_analysis.summary import SUMMARY_COLUMNS

from .conftest import write_trainer_state


def _perturb(state: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: (v * (1 + scale * torch.rand(v.shape[0], *[1] * (v.ndim - 1), generator=g)) + scale * torch.randn(v.shape, generator=g))
        if v.is_floating_point() else v
        for k, v in state.items()
    }  # fmt: skip


def _oracle(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], name: str) -> tuple[float, float]:
    """dM, dD with numpy float64, written independently of dora_analysis.decompose."""
    w0 = base[name].double().numpy()
    w = tuned[name].double().numpy()
    m0 = np.sqrt((w0**2).sum(axis=1))
    m = np.sqrt((w**2).sum(axis=1))
    cos = np.einsum("ij,ij->i", w0, w) / (m0 * m)
    return float(np.mean(np.abs(m - m0))), float(np.mean(1.0 - cos))


def test_cli_layers_csv_matches_numpy_oracle(tiny_bert: tuple[Path, dict], tmp_path: Path) -> None:
    base_dir, base_state = tiny_bert
    tuned_state = _perturb(base_state, 0.05, seed=1)
    tuned_dir = tmp_path / "tuned"
    tuned_dir.mkdir()
    # Saved as .bin, with the task-head prefix a Trainer adds (`bert.`) and an extra head.
    torch.save(
        {"bert." + k: v for k, v in tuned_state.items()} | {"classifier.weight": torch.randn(2, 32)}, tuned_dir / "pytorch_model.bin"
    )
    out = tmp_path / "out"
    assert main([str(base_dir), str(tuned_dir), "--out", str(out), "--no-plots", "--quiet"]) == 0

    layers = pd.read_csv(out / "layers.csv")
    expected = sorted(k for k, v in base_state.items() if k.startswith("encoder.layer.") and v.ndim == 2)
    assert sorted(m + ".weight" for m in layers["module"]) == expected
    for _, row in layers.iterrows():
        dm, dd = _oracle(base_state, tuned_state, row["module"] + ".weight")
        assert row["delta_m"] == pytest.approx(dm, rel=1e-9)
        assert row["delta_d"] == pytest.approx(dd, rel=1e-9)
        assert row["layer"] == int(row["module"].split(".")[2])
    assert set(layers["kind"]) == {"query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"}
    assert (layers["method"] == "ft").all() and (layers["zero_rows"] == 0).all()
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert set(summary["kind"]) == set(layers["kind"]) | {"all"}
    assert (out / "summary.json").is_file()


def _run_folder(root: Path, base_state: dict[str, torch.Tensor], steps: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    states = {}
    for i, step in enumerate(steps):
        d = root / f"checkpoint-{step}"
        d.mkdir(parents=True)
        states[step] = _perturb(base_state, 0.02 * (i + 1), seed=step)
        save_file({k: v.contiguous() for k, v in states[step].items()}, d / "model.safetensors")
        write_trainer_state(d, step)
    return states


def test_run_folder_reads_each_base_matrix_once(tiny_bert: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base_dir, base_state = tiny_bert
    states = _run_folder(tmp_path / "run", base_state, [100, 200, 300])
    store = open_checkpoint(base_dir)
    reads: Counter[str] = Counter()
    real_get = store.get

    def counting_get(key: str) -> torch.Tensor:
        reads[key] += 1
        return real_get(key)

    monkeypatch.setattr(store, "get", counting_get)
    df = da.analyze(store, tmp_path / "run", modules=r"attention\.self\.(query|value)")
    assert sorted(df["step"].unique()) == [100, 200, 300]
    assert len(df) == 3 * 3 * 2  # steps x layers x kinds
    assert set(reads.values()) == {1} and len(reads) == 6
    for _, row in df.iterrows():
        dm, dd = _oracle(base_state, states[row["step"]], row["module"] + ".weight")
        assert row["delta_d"] == pytest.approx(dd, rel=1e-9)
        assert row["delta_m"] == pytest.approx(dm, rel=1e-9)
    assert list(df.columns) == LAYER_COLUMNS


def test_steps_come_from_trainer_state_else_folder_name(tiny_bert: tuple[Path, dict], tmp_path: Path) -> None:
    base_dir, base_state = tiny_bert
    _run_folder(tmp_path / "run", base_state, [5, 10, 15, 20])
    write_trainer_state(tmp_path / "run" / "checkpoint-20", 21)  # trainer_state wins over the name
    (tmp_path / "run" / "checkpoint-5" / "trainer_state.json").unlink()
    df = da.analyze(base_dir, tmp_path / "run", modules="query")
    assert sorted(df["step"].unique()) == [5, 10, 15, 21]
    assert sorted(da.analyze(base_dir, tmp_path / "run", modules="query", last=2)["step"].unique()) == [15, 21]
    assert sorted(da.analyze(base_dir, tmp_path / "run", modules="query", steps=[5, 15])["step"].unique()) == [5, 15]
    single = da.analyze(base_dir, tmp_path / "run" / "checkpoint-10", modules="query")
    assert set(single["step"]) == {10} and set(single["run"]) == {"checkpoint-10"}


def test_several_runs_keep_their_order_labels_and_method(tiny_bert: tuple[Path, dict], tmp_path: Path) -> None:
    base_dir, base_state = tiny_bert
    _run_folder(tmp_path / "a" / "run", base_state, [1, 2])
    _run_folder(tmp_path / "b" / "run", base_state, [1, 2])
    df = da.analyze(base_dir, [tmp_path / "b" / "run", tmp_path / "a" / "run"], modules="value", method="full")
    assert list(df["run"].unique()) == ["run", "run#2"]
    assert set(df["method"]) == {"full"}
    s = da.summarize(df)
    assert list(s["run"].unique()) == ["run", "run#2"]
    assert set(s["kind"]) == {"value", "all"}


def test_summary_statistics_are_those_of_the_points() -> None:
    rng = np.random.default_rng(0)
    dd = rng.uniform(0.1, 0.2, 24)
    dm = 3 * dd + rng.normal(0, 0.01, 24)
    df = pd.DataFrame({
        "run": "r", "method": "lora", "kind": "query", "module": [f"l.{i % 6}.q" for i in range(24)],
        "delta_d": dd, "delta_m": dm,
    })  # fmt: skip
    s = da.summarize(df).set_index("kind")
    assert s.loc["query", "pearson_r"] == pytest.approx(np.corrcoef(dd, dm)[0, 1], rel=1e-12)
    slope, intercept = np.polyfit(dd, dm, 1)
    assert s.loc["query", "slope"] == pytest.approx(slope, rel=1e-9)
    assert s.loc["query", "intercept"] == pytest.approx(intercept, rel=1e-6, abs=1e-12)
    assert s.loc["query", "r_ci_low"] <= s.loc["query", "pearson_r"] <= s.loc["query", "r_ci_high"]
    assert s.loc["all", "n"] == 24


def test_within_and_between_parts_separate() -> None:
    """Within each matrix dM rises with dD; across matrices it falls: the two parts say so."""
    from dora_analysis.stats import within_between

    x, y, g = [], [], []
    for layer in range(6):
        for t in range(4):
            x.append(layer * 1.0 + 0.1 * t)
            y.append(-layer * 1.0 + 0.1 * t)
            g.append(layer)
    r_w, r_b = within_between(x, y, g)
    assert r_w == pytest.approx(1.0) and r_b == pytest.approx(-1.0)


@pytest.mark.parametrize(
    "break_it, message",
    [
        ("drop", "matrix missing from the tuned checkpoint"),
        ("shape", "shape mismatch: base"),
        ("nan", "tuned weight contains NaN or Inf"),
    ],
)
def test_bad_tuned_checkpoints_name_file_and_tensor(tiny_bert: tuple[Path, dict], tmp_path: Path, break_it: str, message: str) -> None:
    base_dir, base_state = tiny_bert
    bad = dict(base_state)
    victim = "encoder.layer.1.attention.self.query.weight"
    if break_it == "drop":
        del bad[victim]
    elif break_it == "shape":
        bad[victim] = torch.zeros(32, 16)
    else:
        bad[victim] = bad[victim].clone()
        bad[victim][3, 3] = math.nan
    save_file({k: v.contiguous() for k, v in bad.items()}, tmp_path / "bad.safetensors")
    with pytest.raises(da.InputError, match=message) as info:
        da.analyze(base_dir, tmp_path / "bad.safetensors")
    text = str(info.value)
    assert "bad.safetensors" in text and victim in text and "\n" not in text


def test_nothing_matching_modules_is_an_error(tiny_bert: tuple[Path, dict]) -> None:
    base_dir, _ = tiny_bert
    with pytest.raises(da.InputError, match="no tensor matches --modules 'nothing_here'"):
        da.analyze(base_dir, base_dir, modules="nothing_here")


def test_adapter_tells_the_layout_when_the_base_has_no_config(tmp_path: Path) -> None:
    """A GPT-2 Conv1D base ([in, out]) without config.json: the adapter's fan_in_fan_out decides."""
    import json

    base = tmp_path / "base.safetensors"
    w0 = torch.randn(8, 24)  # Conv1D: [in=8, out=24]
    save_file({"h.0.attn.c_attn.weight": w0}, base)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["c_attn"], "fan_in_fan_out": True,
    }))  # fmt: skip
    a, b = torch.randn(2, 8), torch.randn(24, 2)
    save_file({
        "base_model.model.h.0.attn.c_attn.lora_A.weight": a,
        "base_model.model.h.0.attn.c_attn.lora_B.weight": b,
    }, adapter / "adapter_model.safetensors")  # fmt: skip
    df = da.analyze(base, adapter, modules="c_attn")
    assert df.loc[0, "rows"] == 24 and df.loc[0, "cols"] == 8
    dm, dd = _oracle({"w": w0.T}, {"w": (w0 + (b @ a).T).T}, "w")
    assert df.loc[0, "delta_d"] == pytest.approx(dd, rel=1e-6)
    assert df.loc[0, "delta_m"] == pytest.approx(dm, rel=1e-6)
