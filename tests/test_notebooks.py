"""The notebooks run top to bottom, in a fresh kernel of this interpreter, in a scratch folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from .test_plots import make_layers

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.fixture
def kernel(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> str:
    """A ``python3`` kernelspec that starts *this* interpreter (the venv's), found first.

    JUPYTER_PATH comes before the user's and the system's kernelspecs, so a ``python3`` kernel
    installed elsewhere (another Python without dora_analysis) cannot be picked up instead.
    """
    share = tmp_path_factory.mktemp("jupyter")
    spec = share / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(share))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.delenv("DORA_RUNS", raising=False)
    return "python3"


def execute(path: Path, workdir: Path, kernel: str) -> nbformat.NotebookNode:
    """Run every cell; a failing cell raises CellExecutionError naming it."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=kernel, timeout=60, startup_timeout=60, resources={"metadata": {"path": str(workdir)}})
    client.execute()
    return nb


def stdout(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("name") == "stdout")


def images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_kernel_is_this_interpreter(tmp_path: Path, kernel: str) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
    NotebookClient(nb, kernel_name=kernel, timeout=60, resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert stdout(nb).strip() == sys.executable


def test_notebooks_exist() -> None:
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "figure2.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path: Path, tmp_path: Path, kernel: str) -> None:
    nb = execute(path, tmp_path, kernel)
    assert images(nb) >= 3  # the figures were drawn and displayed


@pytest.mark.parametrize("n_steps", [4, 8])
def test_figure2_uses_an_analysis_folder(tmp_path: Path, kernel: str, monkeypatch: pytest.MonkeyPatch, n_steps: int) -> None:
    """With DORA_RUNS set, figure2 reads that layers.csv (as the CLI and the reproduction write it)
    instead of simulating; with only figure 2's 4 checkpoints it says why it skips the placements."""
    out = tmp_path / "analysis"
    out.mkdir()
    make_layers(steps=tuple(range(30, 30 * (n_steps + 1), 30))).to_csv(out / "layers.csv", index=False)
    monkeypatch.setenv("DORA_RUNS", str(out))
    nb = execute(Path(__file__).parents[1] / "notebooks" / "figure2.ipynb", tmp_path, kernel)
    assert f"using {out / 'layers.csv'}" in stdout(nb)
    assert ("only 4 checkpoints per run" in stdout(nb)) == (n_steps == 4)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_committed_without_outputs(path: Path) -> None:
    """Outputs belong to a run, not to the repository: they would go stale and bloat diffs."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert nb.metadata["kernelspec"]["name"] == "python3"
