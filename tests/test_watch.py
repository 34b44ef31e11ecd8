"""--watch: checkpoints written one by one, each analysed once, never half-written."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save

import dora_analysis as da
from dora_analysis.cli.analyze import main
from dora_analysis.containers.base import TensorStore
from dora_analysis.watch import complete_checkpoints, watch

from .conftest import write_trainer_state

MODULES = r"attention\.self\.(query|value)"
STEPS = (10, 20, 30)


def _write_slowly(run: Path, state: dict[str, torch.Tensor], pause: float, analysed: threading.Event) -> None:
    """As a Trainer saves: the weights (in two halves, with a pause), then trainer_state.json last.

    Each next checkpoint waits until the watcher has written the previous one's outputs, so
    the test sees one checkpoint per pass however slow the machine is.
    """
    for i, step in enumerate(STEPS):
        if i:
            assert analysed.wait(60), "the watcher never analysed the previous checkpoint"
            analysed.clear()
        time.sleep(pause)
        folder = run / f"checkpoint-{step}"
        folder.mkdir()
        g = torch.Generator().manual_seed(step)
        blob = save({k: (v + 0.01 * (i + 1) * torch.randn(v.shape, generator=g)).contiguous() for k, v in state.items()})
        with (folder / "model.safetensors").open("wb") as fh:
            fh.write(blob[: len(blob) // 2])
            fh.flush()
            time.sleep(pause)
            fh.write(blob[len(blob) // 2 :])
        time.sleep(pause)
        write_trainer_state(folder, step)


def test_watch_picks_up_each_checkpoint_once_and_ends_like_a_one_shot_analysis(
    tiny_bert: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, state = tiny_bert
    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    reads: Counter[str] = Counter()
    premature: list[Path] = []
    real = TensorStore.get

    def counting(self: TensorStore, key: str) -> torch.Tensor:
        path = Path(self.path)
        if run in path.parents:
            reads[path.parent.name] += 1
            if not (path.parent / "trainer_state.json").is_file():
                premature.append(path)
        return real(self, key)

    monkeypatch.setattr(TensorStore, "get", counting)
    analysed = threading.Event()
    writer = threading.Thread(target=_write_slowly, args=(run, state, 0.15, analysed))
    writer.start()
    seen: list[list[int]] = []

    def updated(layers: pd.DataFrame, summary: pd.DataFrame) -> None:
        seen.append([int(s) for s in sorted(layers["step"].unique())])
        analysed.set()

    try:
        layers = watch(
            base, [run], out, until_step=STEPS[-1], poll=0.05, plots=False,
            on_update=updated, modules=MODULES,
        )  # fmt: skip
    finally:
        writer.join()
    assert premature == []
    assert reads == {f"checkpoint-{s}": 6 for s in STEPS}  # each checkpoint's matrices read exactly once
    assert seen == [[10], [10, 20], [10, 20, 30]]
    expected = da.analyze(base, run, modules=MODULES)
    assert (out / "layers.csv").read_text() == expected.to_csv(index=False)
    assert layers is not None and layers.equals(expected)


def test_a_half_written_checkpoint_is_not_complete(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoint-5").mkdir(parents=True)
    (run / "checkpoint-6").mkdir()
    (run / "checkpoint-6" / "trainer_state.json").write_text('{"global_step": 6, "log_hi')  # being written
    (run / "checkpoint-7").mkdir()
    write_trainer_state(run / "checkpoint-7", 7)
    assert complete_checkpoints(run) == [(7, run / "checkpoint-7")]


def test_cli_watch_needs_out_and_until_step_needs_watch(
    tiny_bert: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, _ = tiny_bert
    (tmp_path / "run").mkdir()
    assert main([str(base), str(tmp_path / "run"), "--watch"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main([str(base), str(tmp_path / "run"), "--until-step", "3", "--out", str(tmp_path / "o")]) == 2
    assert "--until-step goes with --watch" in capsys.readouterr().err


def test_ctrl_c_stops_cleanly_with_outputs_intact(tiny_bert: tuple[Path, dict], tmp_path: Path) -> None:
    base, state = tiny_bert
    run, out = tmp_path / "run", tmp_path / "out"
    (run / "checkpoint-10").mkdir(parents=True)
    tuned = {k: (v + 0.01).contiguous() for k, v in state.items()}
    (run / "checkpoint-10" / "model.safetensors").write_bytes(save(tuned))
    write_trainer_state(run / "checkpoint-10", 10)
    analysed = threading.Event()
    interrupter = threading.Thread(target=lambda: analysed.wait(60) and os.kill(os.getpid(), signal.SIGINT))
    interrupter.start()
    layers = watch(base, [run], out, poll=0.05, plots=False, on_update=lambda *_: analysed.set(), modules=MODULES)
    interrupter.join()
    assert layers is not None
    assert (out / "layers.csv").read_text() == da.analyze(base, run, modules=MODULES).to_csv(index=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored


def test_cli_watch_analyses_with_the_same_settings_as_the_one_shot_command(tiny_bert: tuple[Path, dict], tmp_path: Path) -> None:
    """Every analysis option reaches the watched analysis: its layers.csv is the one-shot command's."""
    base, state = tiny_bert
    run = tmp_path / "run"
    for i, step in enumerate(STEPS):
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        g = torch.Generator().manual_seed(step)
        tuned = {k: (v + 0.01 * (i + 1) * torch.randn(v.shape, generator=g)).contiguous() for k, v in state.items()}
        (folder / "model.safetensors").write_bytes(save(tuned))
        write_trainer_state(folder, step)
    options = [
        "--modules", MODULES, "--axis", "in", "--metrics", "md,spectrum", "--rank", "2", "--method", "mine",
        "--steps", "10,30", "--layout", "linear", "--engine", "serial", "--no-plots", "--quiet",
    ]  # fmt: skip
    assert main([str(base), str(run), "--out", str(tmp_path / "once"), *options]) == 0
    assert main([str(base), str(run), "--out", str(tmp_path / "watched"), "--watch", "--until-step", "30", "--poll", "0.05", *options]) == 0
    once = pd.read_csv(tmp_path / "once" / "layers.csv")
    assert set(once["method"]) == {"mine"} and sorted(once["step"].unique()) == [10, 30] and "dw_stable_rank" in once.columns
    default = da.analyze(base, run, modules=MODULES, steps=[10, 30])
    assert not np.allclose(once["delta_d"], default["delta_d"])  # --axis in was applied: the one-shot side is not the default
    assert (tmp_path / "watched" / "layers.csv").read_text() == (tmp_path / "once" / "layers.csv").read_text()
