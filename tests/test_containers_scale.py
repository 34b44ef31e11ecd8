"""Checkpoints that large runs write, each made by the library that writes it, checked against numpy.

torch distributed checkpoints (``torch.distributed.checkpoint.save``), the Hugging Face cache
(``huggingface_hub``'s own cache layout, resolved with ``HF_HUB_OFFLINE=1``), torchtune
``epoch_N/`` runs (saved as torchtune saves them: ``model-0000K-of-0000M.safetensors`` + index,
here by ``transformers``' ``save_pretrained``), Accelerate ``save_state`` runs, PyTorch
Lightning ``.ckpt`` runs (``ModelCheckpoint`` during a short ``fit``), DeepSpeed ZeRO runs
(written by DeepSpeed on the CPU, read through its own consolidation, or refused with the
command that consolidates them), torchtune DoRA adapters (refused).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import dora_analysis as da
from dora_analysis.cli.analyze import main
from dora_analysis.containers import open_checkpoint

QUERY = r"attention\.self\.query"
QUERY_WEIGHT = "encoder.layer.0.attention.self.query.weight"


def _perturb(state: dict[str, torch.Tensor], seed: int, scale: float = 0.03) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: (v * (1 + scale * torch.rand(v.shape[0], *[1] * (v.ndim - 1), generator=g)) + scale * torch.randn(v.shape, generator=g))
        for k, v in state.items()
    }


def _oracle(w0: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """dM, dD in numpy float64, rows as vectors, written apart from dora_analysis."""
    a, b = w0.double().numpy(), w.double().numpy()
    m0, m = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return float(np.mean(np.abs(m - m0))), float(np.mean(1 - (a * b).sum(1) / (m0 * m)))


def _check(df: pd.DataFrame, base: dict[str, torch.Tensor], tuned_by_step: dict[int, dict[str, torch.Tensor]]) -> None:
    assert set(df["step"]) == set(tuned_by_step)
    assert len(df) == len(tuned_by_step) * 3  # three query matrices per step
    for _, row in df.iterrows():
        name = row["module"] + ".weight"
        dm, dd = _oracle(base[name], tuned_by_step[row["step"]][name])
        assert row["delta_m"] == pytest.approx(dm, rel=1e-9)
        assert row["delta_d"] == pytest.approx(dd, rel=1e-9)


# -- torch distributed checkpoints --------------------------------------------------------


def _dcp_save(state: dict, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=folder)


@pytest.mark.parametrize("wrap", ["model.", "model._orig_mod."])
def test_dcp_run_matches_numpy(tiny_bert: tuple[Path, dict], tmp_path: Path, wrap: str) -> None:
    """A run of DCP step folders, as FSDP SHARDED_STATE_DICT saves them: model + optimizer state."""
    base_dir, base = tiny_bert
    tuned = {}
    for step in (10, 20):
        tuned[step] = _perturb(base, seed=step)
        inner = {wrap.removeprefix("model.") + k: v for k, v in tuned[step].items()}  # DCP stores `model.` + these
        optim = {"state": {k: {"exp_avg": torch.zeros_like(v)} for k, v in list(tuned[step].items())[:2]}}
        _dcp_save({"model": inner, "optimizer": optim, "step": step}, tmp_path / "run" / f"checkpoint-{step}")
    store = open_checkpoint(tmp_path / "run" / "checkpoint-10")
    assert not [k for k in store.keys() if k.startswith("optimizer")]
    df = da.analyze(base_dir, tmp_path / "run", modules=QUERY)
    _check(df, base, tuned)


def test_dcp_as_base_reads_each_tensor_exactly(tiny_bert: tuple[Path, dict], tmp_path: Path) -> None:
    _, base = tiny_bert
    _dcp_save({"model": base}, tmp_path / "dcp")
    store = open_checkpoint(tmp_path / "dcp")
    assert sorted(store.keys()) == sorted("model." + k for k in base)
    for k, v in base.items():
        assert store.shape("model." + k) == tuple(v.shape)
        assert torch.equal(store.get("model." + k), v)
    restored = pickle.loads(pickle.dumps(store))  # reopened by path (engines ship stores to workers)
    assert torch.equal(restored.get("model.pooler.dense.weight"), base["pooler.dense.weight"])


def test_dcp_metadata_never_runs_code(tmp_path: Path) -> None:
    _dcp_save({"w": torch.ones(2, 2)}, tmp_path / "dcp")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(da.InputError, match=r"refusing to build (posix|os)\.system"):
        open_checkpoint(tmp_path / "dcp")
    assert not (tmp_path / "pwned").exists()


# -- the Hugging Face cache ----------------------------------------------------------------


def _hf_cache(cache: Path, repo_id: str, source: Path) -> str:
    """Put ``source``'s files into a hub cache with huggingface_hub's own layout functions:
    blobs named by content hash, snapshot files symlinked into them, refs/main -> commit."""
    from huggingface_hub.file_download import _cache_commit_hash_for_specific_revision, _create_symlink, repo_folder_name

    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    for f in sorted(source.iterdir()):
        blob = storage / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(f.read_bytes())
        snap = storage / "snapshots" / commit / f.name
        snap.parent.mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(snap))
    _cache_commit_hash_for_specific_revision(str(storage), "main", commit)
    return commit


@pytest.fixture
def hub(tiny_bert: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    from huggingface_hub import scan_cache_dir

    base_dir, _ = tiny_bert
    cache = tmp_path / "hf" / "hub"
    commit = _hf_cache(cache, "tiny-org/tiny-bert", base_dir)
    info = scan_cache_dir(cache)  # the library recognises the cache as its own
    (repo,) = info.repos
    assert repo.repo_id == "tiny-org/tiny-bert" and {r.commit_hash for r in repo.revisions} == {commit}
    assert {ref for r in repo.revisions for ref in r.refs} == {"main"}
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache, commit


def test_hub_id_and_cache_folder_as_base(tiny_bert: tuple[Path, dict], tmp_path: Path, hub: tuple[Path, str]) -> None:
    base_dir, base = tiny_bert
    cache, commit = hub
    tuned = _perturb(base, seed=3)
    save_file({k: v.contiguous() for k, v in tuned.items()}, tmp_path / "tuned.safetensors")
    expected = da.analyze(base_dir, tmp_path / "tuned.safetensors", modules=QUERY)
    _check(expected, base, {0: tuned})
    for given in ("tiny-org/tiny-bert", f"tiny-org/tiny-bert@{commit}", "tiny-org/tiny-bert@main", cache / "models--tiny-org--tiny-bert"):
        df = da.analyze(given, tmp_path / "tuned.safetensors", modules=QUERY)
        pd.testing.assert_frame_equal(df, expected)


def test_adapter_naming_a_cached_hub_id_needs_no_base(tiny_bert: tuple[Path, dict], tmp_path: Path, hub: tuple[Path, str]) -> None:
    peft = pytest.importorskip("peft")
    from transformers import BertModel

    base_dir, _ = tiny_bert
    model = peft.get_peft_model(
        BertModel.from_pretrained(base_dir), peft.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False)
    )
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "tiny-org/tiny-bert"}))
    out_hub, out_local = tmp_path / "from-hub", tmp_path / "from-local"
    assert main([str(tmp_path / "adapter"), "--out", str(out_hub), "--quiet", "--no-plots"]) == 0
    assert main([str(base_dir), str(tmp_path / "adapter"), "--out", str(out_local), "--quiet", "--no-plots"]) == 0
    assert (out_hub / "layers.csv").read_bytes() == (out_local / "layers.csv").read_bytes()
    assert len(pd.read_csv(out_hub / "layers.csv")) == 3


def test_hub_id_not_in_cache_names_id_and_where(tmp_path: Path, hub: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    cache, _ = hub
    (tmp_path / "t.safetensors").write_bytes(b"")
    assert main(["someone/absent-model", str(tmp_path / "t.safetensors"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "hub id someone/absent-model is not in the Hugging Face cache" in err
    assert str(cache / "models--someone--absent-model") in err


# -- run folders of other trainers ---------------------------------------------------------


def _bert(base_dir: Path, state: dict[str, torch.Tensor]):
    from transformers import BertModel

    model = BertModel.from_pretrained(base_dir)
    model.load_state_dict(state)
    return model


def test_torchtune_epoch_folders(tiny_bert: tuple[Path, dict], tmp_path: Path) -> None:
    """torchtune's full-finetune output: epoch_N/model-0000K-of-0000M.safetensors + index."""
    base_dir, base = tiny_bert
    tuned = {}
    for epoch in range(3):
        tuned[epoch] = _perturb(base, seed=100 + epoch)
        _bert(base_dir, tuned[epoch]).save_pretrained(tmp_path / "out" / f"epoch_{epoch}", max_shard_size="40KB")
    assert (tmp_path / "out" / "epoch_0" / "model.safetensors.index.json").is_file()
    (tmp_path / "out" / "epoch_0" / "recipe_state.pt").write_bytes(b"")  # torchtune's training state, beside
    _check(da.analyze(base_dir, tmp_path / "out", modules=QUERY), base, tuned)


def test_accelerate_save_state_run(tiny_bert: tuple[Path, dict], tmp_path: Path) -> None:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    base_dir, base = tiny_bert
    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(tmp_path / "proj"), automatic_checkpoint_naming=True))
    model = acc.prepare(_bert(base_dir, base))
    tuned = {}
    for n in range(3):
        tuned[n] = _perturb(base, seed=200 + n)
        model.load_state_dict(tuned[n])
        acc.save_state()
    assert sorted(p.name for p in (tmp_path / "proj" / "checkpoints").iterdir()) == ["checkpoint_0", "checkpoint_1", "checkpoint_2"]
    _check(da.analyze(base_dir, tmp_path / "proj" / "checkpoints", modules=QUERY), base, tuned)
    _check(da.analyze(base_dir, tmp_path / "proj", modules=QUERY), base, tuned)  # the project folder too


def test_lightning_ckpt_files(tiny_bert: tuple[Path, dict], tmp_path: Path) -> None:
    """A run of ModelCheckpoint's files, written by PyTorch Lightning training the base for 4 steps."""
    pl = pytest.importorskip("pytorch_lightning")
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import BertModel

    base_dir, base = tiny_bert

    class Module(pl.LightningModule):  # the usual shape: the network as self.model
        def __init__(self) -> None:
            super().__init__()
            self.model = BertModel.from_pretrained(base_dir)

        def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
            return self.model(input_ids=batch[0]).last_hidden_state.pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randint(0, 64, (16, 8))), batch_size=4)
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2, save_top_k=-1, save_last=True)
    trainer = pl.Trainer(
        max_steps=4, callbacks=[saver], logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and loggers
        trainer.fit(Module(), data)
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]  # last.ckpt: no step, not a step
    tuned = {}
    for step in (2, 4):
        saved = torch.load(tmp_path / "checkpoints" / f"epoch=0-step={step}.ckpt", weights_only=True)["state_dict"]
        tuned[step] = {k.removeprefix("model."): v for k, v in saved.items()}
        assert not torch.equal(tuned[step][QUERY_WEIGHT], base[QUERY_WEIGHT])  # training moved it
    _check(da.analyze(base_dir, tmp_path / "checkpoints", modules=QUERY), base, tuned)
    single = da.analyze(base_dir, tmp_path / "checkpoints" / "epoch=0-step=4.ckpt", modules=QUERY)
    _check(single, base, {4: tuned[4]})


def _without_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed... -> ImportError
    monkeypatch.setitem(sys.modules, "deepspeed.utils", None)


def test_deepspeed_zero_folder_is_refused_with_the_command(
    tiny_bert: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without DeepSpeed: the layout alone is recognised, and the message is the command to run."""
    base_dir, _ = tiny_bert
    save = tmp_path / "ds"
    for step in (10, 20):
        tag = save / f"global_step{step}"
        tag.mkdir(parents=True)
        torch.save({"module": None}, tag / "mp_rank_00_model_states.pt")
        torch.save({}, tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (save / "latest").write_text("global_step20")
    (save / "zero_to_fp32.py").write_text("# written by DeepSpeed\n")
    _without_deepspeed(monkeypatch)
    assert main([str(base_dir), str(save), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "DeepSpeed ZeRO checkpoint" in err
    assert f"python {save}/zero_to_fp32.py {save} {save}/global_step10_fp32 -t global_step10" in err


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], Path]:
    """ZeRO-2 fp32 and ZeRO-3 bf16 runs of 2 steps, written by DeepSpeed (tests/_deepspeed_writer.py)."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("zero")
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, max_position_embeddings=16
    )
    BertModel(cfg).save_pretrained(root / "base")
    writer = Path(__file__).with_name("_deepspeed_writer.py")
    # The first DeepSpeed run on a machine compiles its shared-memory op (~30 s on 2 cores).
    done = subprocess.run(
        [sys.executable, str(writer), str(root / "base"), str(root / "runs")], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "base", load_file(root / "base" / "model.safetensors"), root / "runs"


@pytest.mark.parametrize("config", ["zero2-fp32", "zero3-bf16"])
def test_deepspeed_zero_run_is_read_through_deepspeed(zero_runs: tuple[Path, dict, Path], config: str) -> None:
    """With DeepSpeed installed, a run of global_stepN/ folders gives the numbers of its own consolidation."""
    from safetensors.torch import load_file

    base_dir, base, runs = zero_runs
    expected = {step: load_file(runs / f"{config}-expected" / f"global_step{step}.safetensors") for step in (1, 2)}
    assert not torch.equal(expected[2][QUERY_WEIGHT], base[QUERY_WEIGHT])  # training moved it
    _check(da.analyze(base_dir, runs / config, modules=QUERY), base, expected)
    _check(da.analyze(base_dir, runs / config / "global_step1", modules=QUERY), base, {1: expected[1]})


def test_deepspeed_zero_run_is_refused_without_deepspeed(
    zero_runs: tuple[Path, dict, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base_dir, _, runs = zero_runs
    save = runs / "zero2-fp32"
    _without_deepspeed(monkeypatch)
    assert main([str(base_dir), str(save), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"python {save}/zero_to_fp32.py {save} {save}/global_step1_fp32 -t global_step1" in err


def test_a_dry_run_refuses_a_zero_run_without_consolidating_it(
    zero_runs: tuple[Path, dict, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ZeRO step has no headers: planning it would mean holding the whole fp32 model, so --dry-run says how to consolidate it."""
    from dora_analysis.containers import deepspeed

    base_dir, _, runs = zero_runs
    save = runs / "zero2-fp32"
    monkeypatch.setattr(deepspeed, "_consolidate", lambda *a: pytest.fail("consolidated during a dry run"))
    assert main([str(base_dir), str(save), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"error: {save}/global_step1: DeepSpeed ZeRO checkpoint" in err
    assert f"python {save}/zero_to_fp32.py {save} {save}/global_step1_fp32 -t global_step1" in err


def test_the_ray_engine_refuses_a_zero_run_before_ray_starts(
    zero_runs: tuple[Path, dict, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Consolidated in the driver, a ZeRO step could only reach the workers inside the plan: the whole model in every task."""
    pytest.importorskip("ray")
    from dora_analysis import engine_ray

    base_dir, _, runs = zero_runs
    save = runs / "zero2-fp32"
    monkeypatch.setattr(engine_ray, "_connect", lambda *a: pytest.fail("Ray started"))
    out = tmp_path / "out"
    assert main([str(base_dir), str(save), "--quiet", "--engine", "ray", "--workers", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"error: {save}/global_step1: --engine ray" in err and "held in memory" in err
    assert f"python {save}/zero_to_fp32.py {save} {save}/global_step1_fp32 -t global_step1" in err
    assert not out.exists()


class _TouchOnLoad:
    """Unpickling this runs code: it creates a file (pathlib.Path.touch)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return Path.touch, (self.marker,)


def test_a_zero_shard_that_pickles_code_is_refused_unloaded(
    zero_runs: tuple[Path, dict, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """DeepSpeed's consolidation unpickles with weights_only=False; through this reader it is weights-only."""
    base_dir, _, runs = zero_runs
    save = tmp_path / "zero"
    shutil.copytree(runs / "zero2-fp32", save)
    shard = next((save / "global_step2").glob("*optim_states.pt"))
    state = torch.load(shard, weights_only=False)  # the test's own file, written above
    marker = tmp_path / "code-ran"
    state["payload"] = _TouchOnLoad(marker)
    torch.save(state, shard)
    assert main([str(base_dir), str(save / "global_step2"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pickles an object that is not a tensor (" in err and f"error: {shard}:" in err
    assert not marker.exists()


def test_torchtune_dora_adapter_is_refused(tiny_bert: tuple[Path, dict], tmp_path: Path) -> None:
    """torchtune's DoRA adapter_config.json has no use_dora; the merged model beside it is named."""
    base_dir, base = tiny_bert
    epoch = tmp_path / "out" / "epoch_0"
    _bert(base_dir, base).save_pretrained(epoch, max_shard_size="40KB")
    name = "base_model.model.encoder.layer.0.attention.self.query"
    save_file(
        {
            f"{name}.lora_A.weight": torch.randn(2, 32),
            f"{name}.lora_B.weight": torch.randn(32, 2),
            f"{name}.lora_magnitude_vector": torch.rand(32),
        },
        epoch / "adapter_model.safetensors",
    )
    (epoch / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, "target_modules": ["query"], "peft_type": "LORA"}))
    with pytest.raises(da.InputError, match="torchtune DoRA adapter") as info:
        da.analyze(base_dir, tmp_path / "out")
    assert str(epoch / "model.safetensors.index.json") in str(info.value)
