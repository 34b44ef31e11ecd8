"""dora-analyze as a user meets it: exit codes, one-line errors, atomic outputs, sign checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dora_analysis.cli import analyze as cli
from dora_analysis.cli.analyze import main

from .conftest import write_trainer_state


def _tuned_run(root: Path, base_state: dict[str, torch.Tensor], steps: int = 3) -> Path:
    """A run whose layers all grow in magnitude and turn a little more with each step."""
    for i in range(1, steps + 1):
        d = root / f"checkpoint-{10 * i}"
        d.mkdir(parents=True)
        state = {}
        for k, v in base_state.items():
            if v.is_floating_point() and v.ndim == 2:
                layer = int(k.split(".")[2]) if k.startswith("encoder.layer.") else 0
                # dM and dD both grow with step and with layer: a positive correlation.
                v = v * (1 + 0.01 * i * (layer + 1)) + 0.002 * i * (layer + 1) * torch.randn_like(v)
            state[k] = v.contiguous()
        save_file(state, d / "model.safetensors")
        write_trainer_state(d, 10 * i)
    return root


@pytest.fixture
def setup(tiny_bert: tuple[Path, dict], tmp_path: Path) -> tuple[Path, Path]:
    base_dir, base_state = tiny_bert
    return base_dir, _tuned_run(tmp_path / "run", base_state)


def test_prints_summary_and_layer_tables(setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base, run = setup
    assert main([str(base), str(run), "--modules", "query"]) == 0
    out = capsys.readouterr().out
    assert "dM vs dD correlation" in out and "run" in out and "query" in out
    assert "dD / dM per layer" in out


def test_expect_sign_is_a_regression_check(setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base, run = setup
    assert main([str(base), str(run), "--modules", "query", "--quiet", "--expect-sign", "positive"]) == 0
    assert main([str(base), str(run), "--modules", "query", "--quiet", "--expect-sign", "negative"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sign check failed: run run: pearson r = +" in err[0] and "expected negative" in err[0]


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dora_analysis.cli.analyze", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda b, r, t: [str(t / "missing"), str(r)], "missing: no such file or folder"),
        (lambda b, r, t: [str(b), str(t / "notes.txt")], "notes.txt: unknown checkpoint format"),
        (lambda b, r, t: [str(b), str(r), "--modules", "zzz"], "no tensor matches --modules 'zzz'"),
        (lambda b, r, t: [str(b), str(r), "--steps", "x"], "--steps takes comma-separated integers"),
        (lambda b, r, t: [str(t / "notes.txt")], "names no local base model"),
        (lambda b, r, t: [str(t / "adapter"), str(r)], "adapter: BASE is an adapter, not a model"),
    ],
)
def test_bad_input_is_one_line_exit_2_no_traceback(setup: tuple[Path, Path], tmp_path: Path, make_args, message: str) -> None:
    base, run = setup
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    res = _run_cli(*make_args(base, run, tmp_path), "--out", str(tmp_path / "out"))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("dora-analyze: error: ")
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    res = _run_cli(str(tmp_path / "missing"), str(tmp_path / "also-missing"), "--debug")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_failure_while_writing_leaves_no_half_written_output(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, run = setup
    out = tmp_path / "out"
    out.mkdir()
    (out / "layers.csv").write_text("old results\n")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    import dora_analysis.report

    monkeypatch.setattr(dora_analysis.report, "write_report", boom)
    assert main([str(base), str(run), "--out", str(out), "--quiet"]) == 2
    assert (out / "layers.csv").read_text() == "old results\n"  # untouched
    assert sorted(p.name for p in out.iterdir()) == ["layers.csv"]
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


def test_writes_all_outputs(setup: tuple[Path, Path], tmp_path: Path) -> None:
    base, run = setup
    out = tmp_path / "report"
    assert main([str(base), str(run), "--out", str(out), "--quiet", "--modules", "query|value"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"layers.csv", "summary.csv", "summary.json", "report.md", "report.html", "figures"} <= names
    assert any((out / "figures").iterdir())


def test_list_shows_the_default_selection(setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base, _ = setup
    assert main([str(base), "x", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 * 6 and all(line.startswith("encoder.layer.") for line in lines)


def test_help_is_fast_and_lists_the_quick_start() -> None:
    text = cli.build_parser().format_help()
    assert "quick start" in text and "--expect-sign" in text
    res = subprocess.run(
        [sys.executable, "-c", "import sys, dora_analysis.cli.analyze as c; c.build_parser(); print('torch' in sys.modules)"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip() == "False", "building the parser imported torch"
