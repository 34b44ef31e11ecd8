"""PEFT LoRA / DoRA adapters against PEFT itself: W' equals ``merge_and_unload()``.

Every case builds a tiny random-init model, lets PEFT wrap it, randomises every adapter
tensor (non-zero B, perturbed magnitudes, changed ``modules_to_save``), saves the adapter with
``save_pretrained`` and the base as safetensors, then checks

1. the toolkit's W' against PEFT's merged weights, tensor by tensor, within 1e-5 relative,
   and that the adapter claims exactly the tensors PEFT's merge changes;
2. ``dora-analyze BASE ADAPTER --out DIR``'s ``layers.csv`` against dM / dD computed here,
   independently, from the base and PEFT's merged weights.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dora_analysis.adapters import base_path_of, open_adapter
from dora_analysis.analysis import analyze
from dora_analysis.cli.analyze import main
from dora_analysis.containers import open_checkpoint
from dora_analysis.runs import Snapshot, open_run

from .conftest import write_trainer_state

peft = pytest.importorskip("peft", reason="PEFT is the oracle for adapter merges: pip install peft")

REL_TOL = 1e-5


# -- tiny models, one per layer type -------------------------------------------------------


class LinearBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 12)
        self.v = nn.Linear(8, 8)  # square: only the layer type tells its layout


class TinyLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([LinearBlock(), LinearBlock()])
        self.head = nn.Linear(8, 3)


class ConvBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(6, 10, 1)  # 1x1
        self.conv = nn.Conv2d(10, 6, 3)  # 3x3


class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([ConvBlock(), ConvBlock()])
        self.head = nn.Linear(6, 2)


class TinyEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(24, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)


def tiny_gpt2() -> nn.Module:
    """GPT-2, whose attention and MLP matrices are ``Conv1D`` ([in, out], fan_in_fan_out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0, eos_token_id=0))


# -- the cases ------------------------------------------------------------------------------

# layer type -> (model, target_modules, regex of the analysed matrices, regex of [in, out] ones)
LAYERS: dict[str, tuple[Callable[[], nn.Module], list[str], str, str | None]] = {
    "linear": (TinyLinear, ["q", "v"], r"\.(q|v)$", None),
    "conv1d": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], r"\.(c_attn|c_proj|c_fc)$", r"\.(c_attn|c_proj|c_fc)$"),
    "conv2d": (TinyConv, ["pw", "conv"], r"\.(pw|conv)$", None),
    "embedding": (TinyEmbedding, ["embed_tokens", "proj"], r"^(embed_tokens|proj)$", r"^embed_tokens$"),
}

# (layer type, variant) -> LoraConfig settings beyond r=2, lora_alpha=4, target_modules.
VARIANTS: dict[tuple[str, str], dict[str, Any]] = {
    ("linear", "rslora"): {"use_rslora": True, "lora_alpha": 6},
    ("linear", "patterns"): {
        "rank_pattern": {"q": 4},
        "alpha_pattern": {r"layers\.1\.v": 5},
        "layers_to_transform": [1],
        "layers_pattern": "layers",
    },  # fmt: skip
    ("linear", "modules_to_save"): {"modules_to_save": ["head"], "lora_bias": True, "bias": "lora_only"},
    ("conv1d", "rslora"): {"use_rslora": True, "lora_alpha": 6},
    ("conv1d", "patterns"): {"rank_pattern": {"c_fc": 4}, "alpha_pattern": {r"attn\.c_proj": 5}, "layers_to_transform": [0]},
    ("conv1d", "modules_to_save"): {"modules_to_save": ["ln_f"], "lora_bias": True, "bias": "lora_only"},
    ("conv2d", "rslora"): {"use_rslora": True, "lora_alpha": 6},
    ("conv2d", "patterns"): {"rank_pattern": {"conv": 4}, "alpha_pattern": {r"layers\.0\.pw": 5}},
    ("conv2d", "modules_to_save"): {"modules_to_save": ["head"], "lora_bias": True, "bias": "lora_only"},
    ("embedding", "rslora"): {"use_rslora": True, "lora_alpha": 6},
    ("embedding", "patterns"): {"rank_pattern": {"embed_tokens": 4}, "alpha_pattern": {"proj": 5}},
    ("embedding", "modules_to_save"): {"modules_to_save": ["head"], "bias": "all"},  # no lora_bias for Embedding
}

CASES = [
    pytest.param(layer, use_dora, variant, id=f"{layer}-{'dora' if use_dora else 'lora'}-{variant}")
    for (layer, variant) in VARIANTS
    for use_dora in (False, True)
]


# -- helpers ----------------------------------------------------------------------------------


def save_base(model: nn.Module, folder: Path) -> None:
    """The base as a checkpoint folder: transformers models with their config.json."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder)
    else:
        folder.mkdir(parents=True)
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")


def train_step(model: nn.Module, seed: int) -> None:
    """Stand-in for training: move every trainable tensor (A, B, magnitudes, saved modules)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * noise)  # perturbed magnitudes
            else:
                p.add_(0.3 * noise)  # non-zero B, changed A, biases and modules_to_save


def make_adapter(layer: str, use_dora: bool, variant: str, root: Path) -> tuple[Path, Path, nn.Module]:
    """Base folder, adapter folder and PEFT's model (still unmerged) for one case."""
    model_fn, targets, _, _ = LAYERS[layer]
    model = model_fn()
    save_base(model, root / "base")
    settings = {"r": 2, "lora_alpha": 4, "target_modules": targets, "use_dora": use_dora} | VARIANTS[layer, variant]
    if use_dora:
        settings.pop("lora_bias", None)  # PEFT: "The argument lora_bias=True is not supported for DoRA"
    with quiet():
        peft_model = peft.get_peft_model(model, peft.LoraConfig(**settings))
        train_step(peft_model, seed=1)
        peft_model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter", peft_model


@contextmanager
def quiet() -> Iterator[None]:
    """Silence PEFT's notices (fan_in_fan_out corrections, embedding saving, missing base config)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def merged_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's own merge, on a copy so the model can keep training."""
    with quiet():
        return {k: v.detach().clone() for k, v in copy.deepcopy(peft_model).merge_and_unload().state_dict().items()}


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Max abs error within REL_TOL of the tensor's largest value."""
    assert actual.dtype == torch.float32 and actual.shape == expected.shape, name
    err = float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
    assert err <= REL_TOL, f"{name}: relative error {err:.2e}"


def assert_matches_peft_merge(base_dir: Path, snap: Snapshot | None, merged: dict[str, torch.Tensor]) -> set[str]:
    """W' of every claimed tensor equals PEFT's; every other base tensor is untouched by PEFT."""
    assert snap is not None, "not recognised as an adapter"
    base = open_checkpoint(base_dir)
    changed = snap.bind(base)
    assert changed, "the adapter claims no tensor"
    for name in base.keys():
        if name in changed:
            assert_rel_close(snap.weight(name, base.get(name)), merged[name], name)
        else:
            assert torch.equal(base.get(name), merged[name]), f"PEFT changed {name}, the adapter did not claim it"
    return changed


def oracle(w0: torch.Tensor, w: torch.Tensor, *, transposed: bool) -> tuple[float, float]:
    """dM and dD (paper eqs. 3-4) in numpy float64, one vector per output feature."""
    a, b = (w0.T, w.T) if transposed else (w0, w)
    a = a.double().flatten(1).numpy()
    b = b.double().flatten(1).numpy()
    m0, m = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = np.einsum("ij,ij->i", a, b) / (m0 * m)
    return float(np.mean(np.abs(m - m0))), float(np.mean(1.0 - cos))


def assert_layers_match(
    layers: pd.DataFrame, base_dir: Path, merged_by_step: dict[int, dict[str, torch.Tensor]], transposed_re: str | None
) -> None:
    base = open_checkpoint(base_dir)
    for _, row in layers.iterrows():
        name = row["module"] + ".weight"
        transposed = bool(transposed_re and re.search(transposed_re, row["module"]))
        dm, dd = oracle(base.get(name), merged_by_step[row["step"]][name], transposed=transposed)
        assert row["delta_m"] == pytest.approx(dm, rel=1e-5, abs=1e-9), name
        assert row["delta_d"] == pytest.approx(dd, rel=1e-5, abs=1e-9), name


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer, use_dora, variant", CASES)
def test_weights_and_layers_csv_match_peft_merge(layer: str, use_dora: bool, variant: str, tmp_path: Path) -> None:
    base_dir, adapter, peft_model = make_adapter(layer, use_dora, variant, tmp_path)
    merged = merged_state(peft_model)

    changed = assert_matches_peft_merge(base_dir, open_adapter(adapter), merged)
    if variant == "modules_to_save":
        saved = VARIANTS[layer, variant]["modules_to_save"][0]
        assert any(re.search(rf"(^|\.){saved}\.weight$", n) for n in changed)

    _, _, modules, transposed_re = LAYERS[layer]
    out = tmp_path / "out"
    assert main([str(base_dir), str(adapter), "--modules", modules, "--out", str(out), "--no-plots", "--quiet"]) == 0
    layers = pd.read_csv(out / "layers.csv")
    analysed = {n for n in changed if n.endswith(".weight") and re.search(modules, n[: -len(".weight")])}
    assert sorted(layers["module"] + ".weight") == sorted(analysed)
    assert set(layers["method"]) == {"dora" if use_dora else "lora"}
    assert_layers_match(layers, base_dir, {0: merged}, transposed_re)


def test_run_of_three_dora_checkpoints(tmp_path: Path) -> None:
    """A Trainer-style run folder of PEFT DoRA checkpoints: three steps, each with its own W'."""
    model = TinyLinear()
    save_base(model, tmp_path / "base")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], use_dora=True)
    peft_model = peft.get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    merged: dict[int, dict[str, torch.Tensor]] = {}
    for step in (10, 20, 30):
        train_step(peft_model, seed=step)
        folder = tmp_path / "run" / f"checkpoint-{step}"
        with quiet():
            peft_model.save_pretrained(folder)
        write_trainer_state(folder, step)
        merged[step] = merged_state(peft_model)

    run = open_run(tmp_path / "run")
    assert [s for s, _ in run.steps] == [10, 20, 30] and run.method == "dora"
    for step, snap in run.steps:
        assert_matches_peft_merge(tmp_path / "base", snap, merged[step])

    # One path only: the base comes from the adapters' base_model_name_or_path.
    assert base_path_of(tmp_path / "run" / "checkpoint-10") == tmp_path / "base"
    out = tmp_path / "out"
    assert main([str(tmp_path / "run"), "--modules", r"\.(q|v)$", "--out", str(out), "--no-plots", "--quiet"]) == 0
    layers = pd.read_csv(out / "layers.csv")
    assert sorted(layers["step"].unique()) == [10, 20, 30]
    assert len(layers) == 3 * 4  # steps x (2 layers x q, v)
    assert_layers_match(layers, tmp_path / "base", merged, None)
    # The same numbers through the library call.
    df = analyze(tmp_path / "base", tmp_path / "run", modules=r"\.(q|v)$")
    assert np.allclose(df["delta_d"].to_numpy(), layers["delta_d"].to_numpy(), rtol=1e-12)


def test_conv1d_square_layout_without_base_config(tmp_path: Path) -> None:
    """No config.json beside the base: the adapter's fan_in_fan_out decides square Conv1D layouts."""
    base_dir, adapter, peft_model = make_adapter("conv1d", False, "rslora", tmp_path)
    (base_dir / "config.json").unlink()
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True  # set by PEFT for Conv1D
    assert_matches_peft_merge(base_dir, open_adapter(adapter), merged_state(peft_model))
