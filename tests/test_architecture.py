"""The house: a metric or a container is one class plus one registration, and imports flow one way.

A toy metric (the Frobenius norm of the update) and a toy container (a folder of ``.npy``
files) are registered here, and nothing else in the package is touched: each must reach the
DataFrame, ``layers.csv``, the command-line tables and the report on its own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import dora_analysis as da
from dora_analysis.cli.analyze import main
from dora_analysis.containers import CONTAINERS, ContainerReader, TensorStore
from dora_analysis.metrics import METRICS, Column, MatrixContext

from .conftest import write_trainer_state

ROOT = Path(__file__).resolve().parents[1]


class FrobeniusDistance:
    """A toy metric: ||W_t - W0||_F, in float64."""

    name: ClassVar[str] = "fro"
    version: ClassVar[int] = 1
    title: ClassVar[str] = "Distance from the base"
    description: ClassVar[str] = "The Frobenius norm of the update W_t - W0: how far the matrix moved, in its own units."
    columns: ClassVar[tuple[Column, ...]] = (Column("fro_dist", "float64", "||W_t - W0||_F", ".4g", "Frobenius distance"),)
    summary_columns: ClassVar[tuple[Column, ...]] = (Column("fro_mean", "float64", "mean ||W_t - W0||_F", ".4g"),)
    headline: ClassVar[tuple[str, ...]] = ("fro_dist",)

    def prepare(self, base: torch.Tensor, ctx: MatrixContext) -> torch.Tensor:
        return base.double()

    def measure(self, base: torch.Tensor, tuned: torch.Tensor) -> dict[str, object]:
        return {"fro_dist": float(torch.linalg.matrix_norm(tuned.double() - base))}

    def summarize(self, part: pd.DataFrame, *, n_boot: int, seed: int) -> dict[str, object]:
        return {"fro_mean": float(part["fro_dist"].mean())}


class NpyFolder(TensorStore):
    """A toy container: a folder of ``<tensor name>.npy`` files, one tensor each."""

    def keys(self) -> list[str]:
        return sorted(p.name[: -len(".npy")] for p in self.path.glob("*.npy"))

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(np.load(self.path / f"{key}.npy", mmap_mode="r").shape)

    def _read(self, key: str) -> torch.Tensor:
        return torch.from_numpy(np.load(self.path / f"{key}.npy"))


NPY_READER = ContainerReader(
    "npy-folder",
    claims=lambda p: p.is_dir() and any(p.glob("*.npy")),
    open=NpyFolder,
    describes="a folder of <name>.npy files",
)

NAMES = [f"blocks.{i}.attn.{k}.weight" for i in range(3) for k in ("q", "v")]


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal((6, 5)).astype(np.float32) for n in NAMES}


def _fro(base: dict[str, np.ndarray], tuned: dict[str, np.ndarray], name: str) -> float:
    return float(np.linalg.norm(tuned[name].astype(np.float64) - base[name].astype(np.float64)))


def test_a_toy_metric_reaches_every_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base_w = _weights(0)
    tuned = {s: {n: w + 0.1 * s * np.ones_like(w) * (i + 1) for i, (n, w) in enumerate(base_w.items())} for s in (10, 20)}
    save_file({n: torch.from_numpy(w) for n, w in base_w.items()}, str(tmp_path / "base.safetensors"))
    for step, weights in tuned.items():
        folder = tmp_path / "run" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file({n: torch.from_numpy(w) for n, w in weights.items()}, str(folder / "model.safetensors"))
        write_trainer_state(folder, step)

    with METRICS.registered(FrobeniusDistance):
        df = da.analyze(tmp_path / "base.safetensors", tmp_path / "run", metrics=["md", "fro"])
        for row in df.itertuples():
            expected = _fro(base_w, tuned[row.step], f"{row.module}.weight")
            assert row.fro_dist == pytest.approx(expected, rel=1e-12)
        assert list(df.columns)[-1] == "fro_dist" and "delta_d" in df.columns
        summary = da.summarize(df)
        assert "fro_mean" in summary.columns and "pearson_r" in summary.columns

        out = tmp_path / "out"
        argv = [str(tmp_path / "base.safetensors"), str(tmp_path / "run"), "--metrics", "md,fro", "--out", str(out), "--no-plots"]
        assert main(argv) == 0
        printed = capsys.readouterr().out
    assert "Distance from the base, per run and matrix kind" in printed and "fro_mean" in printed
    assert "Frobenius distance per layer at each run's last step" in printed
    layers = pd.read_csv(out / "layers.csv")
    assert np.allclose(layers["fro_dist"], df["fro_dist"], rtol=1e-12)
    report = (out / "report.md").read_text()
    assert "## Distance from the base" in report and "Frobenius norm of the update" in report
    assert "fro_mean" in report or "Frobenius distance" in report
    assert "fro" not in METRICS  # the registration ended with the block


def test_a_toy_container_is_analysed_end_to_end(tmp_path: Path) -> None:
    base_w, tuned_w = _weights(0), _weights(1)
    for folder, weights in (("base", base_w), ("tuned", tuned_w)):
        (tmp_path / folder).mkdir()
        for name, w in weights.items():
            np.save(tmp_path / folder / f"{name}.npy", w)

    with CONTAINERS.registered(NPY_READER, first=True):
        df = da.analyze(tmp_path / "base", tmp_path / "tuned")
    assert len(df) == len(NAMES)
    for row in df.itertuples():
        w0 = base_w[f"{row.module}.weight"].astype(np.float64)
        w = tuned_w[f"{row.module}.weight"].astype(np.float64)
        m0, m = np.linalg.norm(w0, axis=1), np.linalg.norm(w, axis=1)
        cos = (w0 * w).sum(1) / (m0 * m)
        assert row.delta_m == pytest.approx(np.abs(m - m0).mean(), rel=1e-12)
        assert row.delta_d == pytest.approx((1 - cos).mean(), rel=1e-9)
    assert "npy-folder" not in CONTAINERS.names()


def _import_graph() -> dict[str, set[str]]:
    import grimp

    graph = grimp.build_graph("dora_analysis")
    return {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}


def test_the_import_graph_has_no_cycle() -> None:
    graph = _import_graph()
    # Depth-first search; a grey node met again closes a cycle.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for nxt in sorted(graph.get(module, ())):
            if nxt == module or nxt not in graph:
                continue
            # A package's __init__ importing its own submodules is how packages are built,
            # not a cycle between concerns; the reverse edge (a submodule importing its
            # package) is the one that would be.
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_architecture_doc_names_files_that_exist() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:dora_analysis|tests|docs|benchmarks|notebooks)/[\w/.-]+\.(?:py|md|ipynb))`", doc))
    assert len(named) >= 10, "the recipes should name the files to touch"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
    for recipe in ("Add a metric", "Add a checkpoint container", "Add an adapter format", "Add a plot"):
        assert f"## {recipe}" in doc
