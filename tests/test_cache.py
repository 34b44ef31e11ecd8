"""The incremental cache: stored results are reused without reading tensors, and are exact."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import dora_analysis as da
from dora_analysis.cli.analyze import main
from dora_analysis.containers.base import TensorStore
from dora_analysis.metrics.md import MagnitudeDirection

from .conftest import write_trainer_state

MODULES = r"attention\.self\.(query|value)"


def _checkpoint(run: Path, base_state: dict[str, torch.Tensor], step: int) -> None:
    g = torch.Generator().manual_seed(step)
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    tuned = {k: (v * (1 + 0.01 * step / 100 * torch.rand(v.shape[0], *[1] * (v.ndim - 1), generator=g)) + 0.01 * torch.randn(v.shape, generator=g)).contiguous()
             for k, v in base_state.items()}  # fmt: skip
    save_file(tuned, folder / "model.safetensors")
    write_trainer_state(folder, step)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[Path]]:
    """Every tensor read, counted by the file it came from."""
    counts: Counter[Path] = Counter()
    real = TensorStore.get

    def counting(self: TensorStore, key: str) -> torch.Tensor:
        counts[Path(self.path)] += 1
        return real(self, key)

    monkeypatch.setattr(TensorStore, "get", counting)
    yield counts


def _tuned_reads(counts: Counter[Path], run: Path) -> dict[str, int]:
    return {p.parent.name: n for p, n in counts.items() if run in p.parents}


def test_rerun_reads_only_new_checkpoints_and_matches_uncached(tiny_bert: tuple[Path, dict], tmp_path: Path, reads: Counter[Path]) -> None:
    base, state = tiny_bert
    run, cache = tmp_path / "run", tmp_path / "out" / ".cache"
    for step in (10, 20):
        _checkpoint(run, state, step)

    first = da.analyze(base, run, modules=MODULES, cache=cache)
    assert _tuned_reads(reads, run) == {"checkpoint-10": 6, "checkpoint-20": 6}
    pd.testing.assert_frame_equal(first, da.analyze(base, run, modules=MODULES), check_exact=True)

    reads.clear()
    second = da.analyze(base, run, modules=MODULES, cache=cache)
    assert sum(reads.values()) == 0  # no tuned tensor, and no base matrix either
    pd.testing.assert_frame_equal(second, first, check_exact=True)

    _checkpoint(run, state, 30)
    reads.clear()
    third = da.analyze(base, run, modules=MODULES, cache=cache)
    assert _tuned_reads(reads, run) == {"checkpoint-30": 6}
    reads.clear()
    pd.testing.assert_frame_equal(third, da.analyze(base, run, modules=MODULES), check_exact=True)


def test_changed_options_version_or_files_recompute_exactly_what_they_must(
    tiny_bert: tuple[Path, dict], tmp_path: Path, reads: Counter[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, state = tiny_bert
    run, cache = tmp_path / "run", tmp_path / "out" / ".cache"
    for step in (10, 20):
        _checkpoint(run, state, step)
    da.analyze(base, run, modules=MODULES, cache=cache)

    reads.clear()
    by_in = da.analyze(base, run, modules=MODULES, axis="in", cache=cache)
    assert _tuned_reads(reads, run) == {"checkpoint-10": 6, "checkpoint-20": 6}  # another axis: recomputed
    pd.testing.assert_frame_equal(by_in, da.analyze(base, run, modules=MODULES, axis="in"), check_exact=True)
    reads.clear()
    da.analyze(base, run, modules=MODULES, axis="out", cache=cache)
    assert _tuned_reads(reads, run) == {}  # both settings are kept

    # A checkpoint re-saved: a new snapshot identity, recomputed alone.
    weights = run / "checkpoint-20" / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    reads.clear()
    da.analyze(base, run, modules=MODULES, cache=cache)
    assert _tuned_reads(reads, run) == {"checkpoint-20": 6}

    # A metric whose numbers changed bumps its version: nothing stored before is used.
    monkeypatch.setattr(MagnitudeDirection, "version", MagnitudeDirection.version + 1)
    reads.clear()
    da.analyze(base, run, modules=MODULES, cache=cache)
    assert _tuned_reads(reads, run) == {"checkpoint-10": 6, "checkpoint-20": 6}

    # A damaged cache file is recomputed, never trusted.
    for f in cache.glob("*.csv"):
        f.write_text("tensor,fan_in_fan_out,rows\nnot,a,number\n")
    reads.clear()
    again = da.analyze(base, run, modules=MODULES, cache=cache)
    assert sum(_tuned_reads(reads, run).values()) == 12
    pd.testing.assert_frame_equal(again, da.analyze(base, run, modules=MODULES), check_exact=True)


def test_cli_caches_under_out_keeps_it_across_rewrites_and_no_cache_turns_it_off(
    tiny_bert: tuple[Path, dict], tmp_path: Path, reads: Counter[Path]
) -> None:
    base, state = tiny_bert
    run, out = tmp_path / "run", tmp_path / "out"
    _checkpoint(run, state, 10)
    args = [str(base), str(run), "--modules", MODULES, "--out", str(out), "--no-plots", "--quiet"]
    assert main(args) == 0
    first = (out / "layers.csv").read_text()
    assert list((out / ".cache").glob("*.csv"))
    reads.clear()
    assert main(args) == 0  # the outputs are rewritten; the cache folder stays and serves every row
    assert _tuned_reads(reads, run) == {}
    assert (out / "layers.csv").read_text() == first

    fresh = tmp_path / "fresh"
    reads.clear()
    assert main([*args[:-3], str(fresh), "--no-plots", "--quiet", "--no-cache"]) == 0
    assert not (fresh / ".cache").exists()
    assert _tuned_reads(reads, run) == {"checkpoint-10": 6}
    assert (fresh / "layers.csv").read_text() == first
