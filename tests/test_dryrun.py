"""``dora-analyze --dry-run``: the plan costed from headers alone, checked against arithmetic on the shapes."""

from __future__ import annotations

import json
import shutil
from math import prod
from pathlib import Path

import pytest
import torch

from dora_analysis.cli.analyze import main
from dora_analysis.containers import headers_only, open_checkpoint
from dora_analysis.dryrun import plan_costs

# LLaMA-2-70B: 80 layers, hidden 8192, MLP 28672, 8 key/value heads of 128, vocab 32000.
LAYERS, HIDDEN, MLP, KV, VOCAB, CHECKPOINTS = 80, 8192, 28672, 1024, 32000, 20
PROJECTIONS = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (MLP, HIDDEN),
    "mlp.up_proj": (MLP, HIDDEN),
    "mlp.down_proj": (HIDDEN, MLP),
}


def test_a_70b_run_is_planned_from_shapes_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """560 tasks (80 layers x 7 matrices, the default selection) over 20 bf16 checkpoints: the
    bytes read and the largest task's memory are those of the shapes, worked out here."""
    tensors: dict[str, list[int]] = {"model.embed_tokens.weight": [VOCAB, HIDDEN], "lm_head.weight": [VOCAB, HIDDEN]}
    for i in range(LAYERS):
        tensors |= {f"model.layers.{i}.{name}.weight": list(shape) for name, shape in PROJECTIONS.items()}
        tensors |= {f"model.layers.{i}.input_layernorm.weight": [HIDDEN], f"model.layers.{i}.post_attention_layernorm.weight": [HIDDEN]}
    text = json.dumps({"dtype": "bfloat16", "tensors": tensors})
    (tmp_path / "base.shapes.json").write_text(text)
    for n in range(1, CHECKPOINTS + 1):
        step = tmp_path / "run" / f"checkpoint-{100 * n}"
        step.mkdir(parents=True)
        (step / "model.shapes.json").write_text(text)

    assert main([str(tmp_path / "base.shapes.json"), str(tmp_path / "run"), "--dry-run"]) == 0
    out = capsys.readouterr().out

    per_layer = sum(prod(shape) for shape in PROJECTIONS.values()) * 2  # bf16 bytes
    total = per_layer * LAYERS * (1 + CHECKPOINTS)  # the base once, every checkpoint once
    assert total == 2_874_943_733_760  # 2.875 TB, as docs/scaling.md works it out by hand
    assert f"tasks: {LAYERS * len(PROJECTIONS)} (one per base matrix); tuned matrices: {LAYERS * len(PROJECTIONS) * CHECKPOINTS}" in out
    assert f"bytes read in all: 2.87 TB ({total} B)" in out
    mlp_bytes = MLP * HIDDEN * 2
    # Peak: base + one tuned matrix as stored, two float64 blocks of 64 Ki elements, four float64 values per row.
    peak = 2 * mlp_bytes + 2 * 8 * 2**16 + 4 * 8 * MLP
    assert f"largest task: model.layers.0.mlp.gate_proj.weight: reads {mlp_bytes * 21 / 1e9:.2f} GB, peak memory {peak / 1e6:.2f} MB" in out
    assert "held for the whole run" not in out  # shapes are read one at a time: nothing is held


def test_a_legacy_pickle_is_planned_without_loading_it_and_what_it_holds_is_printed(
    tiny_bert: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A legacy-format torch file has no offsets to map: a run reads it whole and holds it, so the
    plan says so, with the bytes; the plan itself unpickles it onto the meta device only."""
    base_dir, state = tiny_bert
    paths = {}
    for side, scale in (("base-legacy", 1.0), ("tuned-legacy", 1.01)):
        folder = tmp_path / side
        folder.mkdir()
        shutil.copy(base_dir / "config.json", folder / "config.json")
        torch.save({k: v * scale for k, v in state.items()}, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
        paths[side] = folder

    plan = plan_costs(paths["base-legacy"], [paths["tuned-legacy"]])
    files = [paths[side] / "pytorch_model.bin" for side in ("base-legacy", "tuned-legacy")]
    assert plan.held == [(path, path.stat().st_size) for path in files]

    with headers_only():
        store = open_checkpoint(files[0])
    name = next(iter(store.keys()))
    assert store.shape(name) == tuple(state[name].shape)
    with pytest.raises(RuntimeError, match="opened for headers only"):
        store.get(name)  # its tensors are on the meta device: no data is held

    assert main([str(paths["base-legacy"]), str(paths["tuned-legacy"]), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "held for the whole run by every process that runs tasks, on top of each task's peak:" in out
    assert "read whole from 2 checkpoint(s)" in out


def test_a_zip_pickle_holds_nothing(tiny_bert: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    """The zip format (torch >= 1.6) is mapped one tensor at a time: nothing is held."""
    base_dir, state = tiny_bert
    folder = tmp_path / "zip"
    folder.mkdir()
    shutil.copy(base_dir / "config.json", folder / "config.json")
    torch.save(state, folder / "pytorch_model.bin")
    assert plan_costs(folder, [folder]).held == []
