"""The ray engine gives what the serial engine gives: the same bytes, the same errors, through a killed worker.

One local Ray cluster (``num_cpus=2``) serves the whole session; each test compares
``dora-analyze ... --engine ray`` with ``--engine serial`` on the same inputs.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from dora_analysis import engine_ray
from dora_analysis.cli.analyze import main

from .conftest import write_trainer_state


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def _perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v * (1 + 0.02 * torch.randn(v.shape, generator=g))).contiguous() for k, v in state.items()}


def _run(root: Path, base: dict[str, torch.Tensor], steps: int = 3) -> Path:
    for i in range(1, steps + 1):
        folder = root / f"checkpoint-{10 * i}"
        folder.mkdir(parents=True)
        save_file(_perturbed(base, i), folder / "model.safetensors")
        write_trainer_state(folder, 10 * i)
    return root


def _peft_adapter(base_dir: Path, out: Path, dora: bool) -> Path:
    peft = pytest.importorskip("peft")
    from transformers import BertModel

    cfg = peft.LoraConfig(r=2, target_modules=["query", "value"], use_dora=dora, init_lora_weights=False)
    model = peft.get_peft_model(BertModel.from_pretrained(base_dir), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand_like(p))
    model.save_pretrained(out)
    return out


def _layers(args: list[str], out: Path, *engine: str) -> bytes:
    assert main([*args, "--out", str(out), "--quiet", "--no-plots", "--no-cache", *engine]) == 0
    return (out / "layers.csv").read_bytes()


@pytest.mark.parametrize("case", ["ft run of 3 checkpoints", "peft lora", "peft dora"])
def test_layers_csv_is_byte_identical(ray_cluster, tiny_bert: tuple[Path, dict], tmp_path: Path, case: str) -> None:
    base_dir, base = tiny_bert
    if case.startswith("ft"):
        tuned = _run(tmp_path / "run", base)
    else:
        tuned = _peft_adapter(base_dir, tmp_path / "adapter", dora=case.endswith("dora"))
    args = [str(base_dir), str(tuned), "--all-modules"]
    serial = _layers(args, tmp_path / "serial")
    assert _layers(args, tmp_path / "ray", "--engine", "ray") == serial
    assert _layers(args, tmp_path / "ray1", "--engine", "ray", "--workers", "1") == serial
    assert serial.count(b"\n") > 6  # a header and at least six rows


@pytest.mark.parametrize("break_it", ["nan", "shape"])
def test_bad_input_in_a_task_is_the_same_error(
    ray_cluster, tiny_bert: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str], break_it: str
) -> None:
    base_dir, base = tiny_bert
    bad = dict(base)
    victim = "encoder.layer.1.attention.self.query.weight"
    if break_it == "nan":
        bad[victim] = bad[victim].clone()
        bad[victim][2, 2] = math.nan
    else:
        bad[victim] = torch.zeros(32, 16)
    save_file({k: v.contiguous() for k, v in bad.items()}, tmp_path / "bad.safetensors")
    errors = []
    for engine in ("serial", "ray"):
        out = tmp_path / f"out-{engine}"
        assert main([str(base_dir), str(tmp_path / "bad.safetensors"), "--quiet", "--out", str(out), "--engine", engine]) == 2
        assert not out.exists()
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1]
    assert errors[0].count("\n") == 1 and victim in errors[0] and "bad.safetensors" in errors[0]


def test_with_two_bad_tasks_the_error_is_the_first_in_plan_order(
    ray_cluster, tiny_bert: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The larger bad matrix comes later in the plan but is sent first (largest tasks first, one
    # task per batch here), so its error comes back first; the serial engine names the earlier.
    monkeypatch.setattr(engine_ray, "BATCHES_PER_CPU", 10**9)
    base_dir, base = tiny_bert
    early, late = "encoder.layer.0.attention.self.query.weight", "encoder.layer.2.intermediate.dense.weight"
    assert base[late].numel() > base[early].numel()
    bad = dict(base)
    for victim in (early, late):
        bad[victim] = bad[victim].clone()
        bad[victim][1, 1] = math.nan
    save_file({k: v.contiguous() for k, v in bad.items()}, tmp_path / "bad.safetensors")
    errors = []
    for engine in ("serial", "ray"):
        args = [str(base_dir), str(tmp_path / "bad.safetensors"), "--all-modules", "--quiet", "--out", str(tmp_path / engine)]
        assert main([*args, "--engine", engine]) == 2
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1] and early in errors[0]


def test_batches_cover_the_plan_once_largest_first() -> None:
    class Shapes:
        def shape(self, name: str) -> tuple[int, ...]:
            return (int(name), 1)

    tasks = [SimpleNamespace(name=str(size), jobs=(None,)) for size in (5, 100, 1, 1, 1, 1, 60, 2, 2, 1)]
    batches = engine_ray._batches(tasks, Shapes(), cpus=2)  # type: ignore[arg-type]
    assert sorted(i for b in batches for i in b) == list(range(len(tasks)))
    assert batches[:2] == [[1], [6]]  # the two largest, each alone (each is over 1/16 of the work)
    assert all(b == sorted(b) for b in batches)  # plan order within a batch


def test_a_killed_worker_is_retried_with_the_same_result(
    ray_cluster, tiny_bert: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_dir, base = tiny_bert
    run = _run(tmp_path / "run", base)
    args = [str(base_dir), str(run), "--modules", "query|value"]
    serial = _layers(args, tmp_path / "serial")
    marker = tmp_path / "worker-killed"
    monkeypatch.setattr(engine_ray, "_TEST_CRASH_ONCE", str(marker))
    assert _layers(args, tmp_path / "ray", "--engine", "ray") == serial
    assert marker.exists()  # a worker did die (os._exit) in its first attempt


def test_options_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.safetensors").write_bytes(b"")
    assert main([str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors"), "--workers", "2"]) == 2
    assert "--workers applies to --engine ray" in capsys.readouterr().err


def test_without_ray_the_error_says_how_to_install_it(tiny_bert: tuple[Path, dict], tmp_path: Path, monkeypatch, capsys) -> None:
    base_dir, base = tiny_bert
    save_file(_perturbed(base, 1), tmp_path / "t.safetensors")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    engine_ray._remote.cache_clear()
    assert main([str(base_dir), str(tmp_path / "t.safetensors"), "--quiet", "--engine", "ray"]) == 2
    err = capsys.readouterr().err
    assert "--engine ray needs Ray" in err and "pip install 'dora-analysis[ray]'" in err
    engine_ray._remote.cache_clear()


def test_stores_travel_as_paths(tiny_bert: tuple[Path, dict], tmp_path: Path) -> None:
    """What the engine puts in Ray's object store: paths and headers, never tensor data."""
    import pickle

    from dora_analysis.containers import open_checkpoint

    base_dir, base = tiny_bert
    torch.save(base, tmp_path / "pytorch_model.bin")
    for path in (base_dir, tmp_path / "pytorch_model.bin"):
        store = open_checkpoint(path)
        store.get(next(iter(store.keys())))
        blob = pickle.dumps(store)
        assert len(blob) < 20_000, len(blob)  # the model is ~150 KB
        again = pickle.loads(blob)
        assert all(torch.equal(again.get(k), base[k]) for k in base)
    assert json.loads((base_dir / "config.json").read_text())["model_type"] == "bert"


def test_a_store_held_in_memory_is_refused_by_name() -> None:
    """Pickled into the plan, a live model's tensors would travel to every worker: refused, with how to save them."""
    from dora_analysis.containers import MemoryStore
    from dora_analysis.errors import InputError

    live = MemoryStore({"w": torch.zeros(4, 4)}, Path("live-model"))
    with pytest.raises(InputError, match=r"^live-model: --engine ray .* held in memory .*\(save it to files first"):
        engine_ray._plan_bytes(([], live))
    saved = MemoryStore({"w": torch.zeros(4, 4)}, Path("step"), to_files="run save.py")
    with pytest.raises(InputError, match=r"\(run save\.py\)$"):
        engine_ray._plan_bytes(([], saved))
