"""The hostile corpus: inputs a new user really brings, each answered right or refused by name.

One parametrized list (:data:`CASES`), every case built here from nothing (with safetensors,
PEFT's config class, LyCORIS, the bitsandbytes formula ...). Each case runs the command
in-process and asserts its exact exit status. A refusal must be one line
``dora-analyze: error: ...`` naming the file, with no traceback, never the generic
"rerun with --debug" line (that one is for bugs), and nothing new in ``--out``. A valid but
unusual input must exit 0 with numbers that match an independent numpy float64 computation.

The signal and exit-hook checks need a real process: they are the few subprocess tests at
the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from dora_analysis.cli.analyze import main as analyze_main
from dora_analysis.cli.train import main as train_main

SHAPE = (8, 6)  # [out, in] of every block matrix
LAYERS = 3
KINDS = ("q_proj", "v_proj")


# --- an independent reference: the paper's eqs. 3-4 in numpy float64 ------------------------


def reference(w0: np.ndarray, w: np.ndarray, *, columns: bool = False) -> tuple[float, float]:
    """dM and dD of one matrix in float64; the vectors are its rows (or its columns)."""
    a, b = np.asarray(w0, np.float64), np.asarray(w, np.float64)
    if columns:
        a, b = a.T, b.T
    m0, m = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    keep = (m0 > 0) & (m > 0)
    d_m = float(np.mean(np.abs(m - m0)))
    if not keep.any():
        return d_m, math.nan
    cos = np.sum(a[keep] * b[keep], axis=1) / (m0[keep] * m[keep])
    return d_m, float(np.mean(1 - np.clip(cos, -1, 1)))


def f64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


# --- building blocks ---------------------------------------------------------------------------


def name(i: int, kind: str) -> str:
    return f"model.layers.{i}.self_attn.{kind}.weight"


def model(seed: int = 0, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {name(i, k): torch.randn(*SHAPE, generator=g) for i in range(LAYERS) for k in KINDS}
    state["model.embed_tokens.weight"] = torch.randn(16, SHAPE[1], generator=g)
    state["model.norm.weight"] = torch.ones(SHAPE[1])
    state.update(extra)
    return state


def tuned_from(base: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """Every 2-D tensor grown and turned a little, differently per matrix."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in base.items():
        if v.is_floating_point() and v.ndim == 2:
            v = v * (1 + 0.05 * torch.rand(v.shape[0], 1, generator=g)) + 0.05 * torch.randn(v.shape, generator=g)
        out[k] = v.clone()
    return out


def save(folder: Path, state: dict[str, torch.Tensor], *, config: dict | None = None, file: str = "model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / file)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def pair(tmp: Path, base: dict | None = None, tuned: dict | None = None, **kw) -> tuple[Path, Path, dict, dict]:
    base = model() if base is None else base
    tuned = tuned_from(base) if tuned is None else tuned
    return save(tmp / "base", base, **kw), save(tmp / "tuned", tuned), base, tuned


def expect_numbers(expected: Callable[[Path], dict[str, tuple[float, float]]], rel: float = 1e-9) -> Callable[[Path, pd.DataFrame], None]:
    """A check of layers.csv against ``{module: (dM, dD)}`` from the reference."""

    def check(tmp: Path, layers: pd.DataFrame) -> None:
        want = expected(tmp)
        got = {row.module: (row.delta_m, row.delta_d) for row in layers.itertuples()}
        assert set(got) == set(want), (sorted(got), sorted(want))
        for module, (d_m, d_d) in want.items():
            assert got[module][0] == pytest.approx(d_m, rel=rel, abs=1e-12), module
            if math.isnan(d_d):
                assert math.isnan(got[module][1]), module
            else:
                assert got[module][1] == pytest.approx(d_d, rel=rel, abs=1e-12), module

    return check


def module_of(tensor: str) -> str:
    return tensor.removesuffix(".weight")


def block_reference(base: dict, tuned: dict, *, columns: bool = False, names: list[str] | None = None) -> dict[str, tuple[float, float]]:
    names = names or [name(i, k) for i in range(LAYERS) for k in KINDS]
    return {module_of(n): reference(f64(base[n]), f64(tuned[n]), columns=columns) for n in names}


@dataclass(frozen=True)
class Case:
    """One hostile input.

    Attributes:
        id: What it is.
        build: Writes the files under a fresh folder; returns the command's arguments.
        code: The exact exit status expected.
        message: A regex the one error line must match (refusals).
        names: What the error line must name: a file or folder (its last part, or a path).
        check: For exit 0: numbers from layers.csv against the reference.
        command: ``analyze`` or ``train``.
    """

    id: str
    build: Callable[[Path], list[str]]
    code: int
    message: str = ""
    names: str = ""
    check: Callable[[Path, pd.DataFrame], None] | None = None
    command: str = "analyze"


CASES: list[Case] = []


def case(id: str, code: int, message: str = "", names: str = "", check=None, command: str = "analyze"):
    def register(build: Callable[[Path], list[str]]) -> Callable[[Path], list[str]]:
        CASES.append(Case(id, build, code, message, names, check, command))
        return build

    return register


# --- 1. never silently wrong: quantized and integer weights ------------------------------------
#
# bitsandbytes LLM.int8() as its source writes it (bitsandbytes 0.50): Int8Params._quantize
# casts the weight to float16 (nn/modules.py), int8_vectorwise_quant takes SCB = absmax of
# each row and CB = round(W * (127 / SCB)) (backends/default/ops.py), and dequantization is
# CB * SCB * (1/127) (_ops.py). Linear8bitLt.state_dict() holds weight (int8), SCB (float32,
# one per row) and weight_format (uint8, 0 = row). test_int8_matches_bitsandbytes_itself
# checks this against the library where it is installed (`pip install bitsandbytes`: 0.50.2
# installs and runs on CPU).


def bnb_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = w.to(torch.float16)
    scb = half.abs().amax(dim=1).float()
    codes = torch.round(half * (127.0 / scb.unsqueeze(-1))).to(torch.int8)
    return codes, scb


def bnb_dequant(codes: torch.Tensor, scb: torch.Tensor) -> np.ndarray:
    return f64(codes) * f64(scb)[:, None] / 127.0


def _int8_tuned(tmp: Path, *, weight_format: int | None = None, base_too: bool = False) -> tuple[dict, dict]:
    base = model()
    tuned = tuned_from(base)
    stored_t, stored_b = dict(tuned), dict(base)
    ref_t, ref_b = {}, {}
    for n in [name(i, k) for i in range(LAYERS) for k in KINDS]:
        mod = module_of(n)
        codes, scb = bnb_int8(tuned[n])
        stored_t[n], stored_t[f"{mod}.SCB"] = codes, scb
        if weight_format is not None:
            stored_t[f"{mod}.weight_format"] = torch.tensor(weight_format, dtype=torch.uint8)
        ref_t[n] = bnb_dequant(codes, scb)
        ref_b[n] = f64(base[n])
        if base_too:
            codes_b, scb_b = bnb_int8(base[n])
            stored_b[n], stored_b[f"{mod}.SCB"] = codes_b, scb_b
            ref_b[n] = bnb_dequant(codes_b, scb_b)
    save(tmp / "base", stored_b)
    save(tmp / "tuned", stored_t)
    return ref_b, ref_t


def _ref_from(ref_b: dict, ref_t: dict) -> dict[str, tuple[float, float]]:
    return {module_of(n): reference(ref_b[n], ref_t[n]) for n in ref_b}


_STASH: dict[str, object] = {}


def _stash_refs(tmp: Path, refs: dict[str, tuple[float, float]]) -> None:
    _STASH[str(tmp)] = refs


def _stashed(tmp: Path) -> dict[str, tuple[float, float]]:
    return _STASH.pop(str(tmp))  # type: ignore[return-value]


STASHED = expect_numbers(_stashed, rel=1e-5)  # dequantized in float32 by the tool, float64 here
STASHED_EXACT = expect_numbers(_stashed)


@case("bnb int8 + SCB tuned: dequantized as bitsandbytes does", 0, check=STASHED)
def _(tmp: Path) -> list[str]:
    _stash_refs(tmp, _ref_from(*_int8_tuned(tmp)))
    return [str(tmp / "base"), str(tmp / "tuned")]


@case("bnb int8 + SCB on both sides", 0, check=STASHED)
def _(tmp: Path) -> list[str]:
    _stash_refs(tmp, _ref_from(*_int8_tuned(tmp, base_too=True)))
    return [str(tmp / "base"), str(tmp / "tuned")]


@case("bnb int8 + SCB + weight_format row", 0, check=STASHED)
def _(tmp: Path) -> list[str]:
    _stash_refs(tmp, _ref_from(*_int8_tuned(tmp, weight_format=0)))
    return [str(tmp / "base"), str(tmp / "tuned")]


@case("bnb int8 in a tiled layout (col32)", 2, r"tiled layout", "model.safetensors")
def _(tmp: Path) -> list[str]:
    _int8_tuned(tmp, weight_format=1)
    return [str(tmp / "base"), str(tmp / "tuned")]


@case("bnb int8 with an SCB of the wrong length", 2, r"one SCB scale per row", "model.safetensors")
def _(tmp: Path) -> list[str]:
    base = model()
    tuned = tuned_from(base)
    codes, scb = bnb_int8(tuned[name(0, "q_proj")])
    tuned[name(0, "q_proj")], tuned[module_of(name(0, "q_proj")) + ".SCB"] = codes, scb[:3]
    pair(tmp, base, tuned)
    return [str(tmp / "base"), str(tmp / "tuned")]


def _scaled(tmp: Path, strategy: str, dtype: torch.dtype = torch.int8, zero: bool = False) -> list[str]:
    """compressed-tensors: W = (q - zero_point) * scale (its lifecycle/forward.py dequantize)."""
    base = model()
    tuned = tuned_from(base)
    stored, ref_t = dict(tuned), {}
    for n in [name(i, k) for i in range(LAYERS) for k in KINDS]:
        w, mod = tuned[n], module_of(n)
        if strategy == "tensor":
            scale = w.abs().max().reshape(1) / 100
            full = scale.view(1, 1)
        elif strategy == "channel":
            scale = w.abs().amax(dim=1, keepdim=True) / 100
            full = scale
        else:  # two groups of 3 inputs
            scale = w.abs().reshape(SHAPE[0], 2, 3).amax(dim=2) / 100
            full = scale.repeat_interleave(3, dim=1)
        zp = torch.randint(-3, 4, scale.shape).float() if zero else torch.zeros_like(scale)
        zp_full = zp.repeat_interleave(3, dim=1) if strategy == "group" else zp.view(-1, 1) if strategy == "channel" else zp.view(1, 1)
        if dtype == torch.int8:
            q = torch.round(w / full + zp_full).clamp(-128, 127).to(torch.int8)
        else:
            q = (w / full).to(dtype)
        stored[n], stored[f"{mod}.weight_scale"] = q, scale
        if zero:
            stored[f"{mod}.weight_zero_point"] = zp.to(torch.int8)
        ref_t[n] = (f64(q) - f64(zp_full)) * f64(full)
    pair(tmp, base, stored)
    _stash_refs(tmp, {module_of(n): reference(f64(base[n]), ref_t[n]) for n in ref_t})
    return [str(tmp / "base"), str(tmp / "tuned")]


case("int8 weight_scale per tensor", 0, check=STASHED)(lambda tmp: _scaled(tmp, "tensor"))
case("int8 weight_scale per channel + weight_zero_point", 0, check=STASHED)(lambda tmp: _scaled(tmp, "channel", zero=True))
case("int8 weight_scale per group", 0, check=STASHED)(lambda tmp: _scaled(tmp, "group"))
case("float8 e4m3 weight with a per-channel weight_scale", 0, check=STASHED)(lambda tmp: _scaled(tmp, "channel", torch.float8_e4m3fn))


def _companions(tmp: Path, extra: Callable[[str, torch.Tensor], dict[str, torch.Tensor]], replace: bool = True) -> list[str]:
    base = model()
    tuned = tuned_from(base)
    n = name(1, "v_proj")
    new = extra(module_of(n), tuned[n])
    if replace:
        del tuned[n]
    tuned.update(new)
    pair(tmp, base, tuned)
    return [str(tmp / "base"), str(tmp / "tuned")]


def _nf4(mod: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    # Linear4bit's state dict: packed uint8 codes [n/2, 1] and the quant_state companions.
    return {
        f"{mod}.weight": torch.randint(0, 255, (w.numel() // 2, 1), dtype=torch.uint8),
        f"{mod}.weight.absmax": torch.rand(1),
        f"{mod}.weight.quant_map": torch.linspace(-1, 1, 16),
        f"{mod}.weight.quant_state.bitsandbytes__nf4": torch.zeros(64, dtype=torch.uint8),
    }


case("bnb packed 4-bit nf4", 2, r"bitsandbytes packed 4-bit \(nf4\)", "model.safetensors")(lambda tmp: _companions(tmp, _nf4))
case("GPTQ qweight", 2, r"GPTQ / AWQ packed int4", "model.safetensors")(
    lambda tmp: _companions(
        tmp,
        lambda mod, w: {
            f"{mod}.qweight": torch.randint(0, 2**30, (1, 8), dtype=torch.int32),
            f"{mod}.qzeros": torch.zeros(1, 1, dtype=torch.int32),
            f"{mod}.scales": torch.rand(1, 8),
        },
    )
)
case("block-wise FP8 with weight_scale_inv", 2, r"block-wise FP8", "model.safetensors")(
    lambda tmp: _companions(tmp, lambda mod, w: {f"{mod}.weight": w.to(torch.float8_e4m3fn), f"{mod}.weight_scale_inv": torch.ones(1, 1)})
)
case("weight_scale of no documented shape", 2, r"fits no documented layout", "model.safetensors")(
    lambda tmp: _companions(
        tmp, lambda mod, w: {f"{mod}.weight": torch.ones(SHAPE, dtype=torch.int8), f"{mod}.weight_scale": torch.ones(5, 7)}
    )
)
case("raw int8 codes without a scale, tuned", 2, r"stored as int8: raw integer codes", "tuned/model.safetensors")(
    lambda tmp: _companions(tmp, lambda mod, w: {f"{mod}.weight": torch.ones(SHAPE, dtype=torch.int8)})
)


@case("raw int8 codes without a scale, base", 2, r"stored as int8: raw integer codes", "base/model.safetensors")
def _(tmp: Path) -> list[str]:
    base = model()
    tuned = tuned_from(base)
    base[name(0, "q_proj")] = torch.ones(SHAPE, dtype=torch.int8)
    pair(tmp, base, tuned)
    return [str(tmp / "base"), str(tmp / "tuned")]


@case("int32 tensor picked by --all-modules", 2, r"stored as int32", "base/model.safetensors")
def _(tmp: Path) -> list[str]:
    pair(tmp, model(**{"model.position_ids": torch.arange(12, dtype=torch.int32).reshape(2, 6)}))
    return [str(tmp / "base"), str(tmp / "tuned"), "--all-modules"]


@case("bool mask stored in a block", 2, r"stored as bool", "model.safetensors")
def _(tmp: Path) -> list[str]:
    base = model(**{"model.layers.0.attn_mask.weight": torch.ones(4, 4, dtype=torch.bool)})
    pair(tmp, base)
    return [str(tmp / "base"), str(tmp / "tuned")]


# --- 1b. layout without config.json ----------------------------------------------------------


def _gpt2(tmp: Path, *, shapes: dict[str, tuple[int, int]], config: dict | None = None) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(3)
    base = {f"h.{i}.{k}.weight": torch.randn(*s, generator=g) for i in range(2) for k, s in shapes.items()}
    base["wte.weight"] = torch.randn(10, 4, generator=g)
    tuned = {k: v * (1 + 0.1 * torch.rand(1, v.shape[1], generator=g)) + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    pair(tmp, base, tuned, config=config)
    return base, tuned


GPT2_SHAPES = {"attn.c_attn": (4, 12), "attn.c_proj": (4, 4), "mlp.c_fc": (4, 16), "mlp.c_proj": (16, 4)}
BIGCODE_SHAPES = {"attn.c_attn": (6, 4), "attn.c_proj": (4, 4), "mlp.c_fc": (16, 4), "mlp.c_proj": (4, 16)}


def _layout_case(shapes: dict, columns: bool, args: tuple[str, ...] = (), config: dict | None = None) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        base, tuned = _gpt2(tmp, shapes=shapes, config=config)
        _stash_refs(tmp, {module_of(n): reference(f64(base[n]), f64(tuned[n]), columns=columns) for n in base if n.startswith("h.")})
        return [str(tmp / "base"), str(tmp / "tuned"), *args]

    return build


case("GPT-2 Conv1D names, no config.json: [in, out] from the shapes", 0, check=STASHED_EXACT)(_layout_case(GPT2_SHAPES, True))
case("GPTBigCode names (Linear), no config.json: [out, in] from the shapes", 0, check=STASHED_EXACT)(_layout_case(BIGCODE_SHAPES, False))
case("GPT-2 names with config.json model_type gpt2", 0, check=STASHED_EXACT)(_layout_case(GPT2_SHAPES, True, config={"model_type": "gpt2"}))
case("GPT-2 names, --layout linear wins over the shapes", 0, check=STASHED_EXACT)(_layout_case(GPT2_SHAPES, False, ("--layout", "linear")))


@case(
    "only square c_proj matrices and no config.json",
    2,
    r"cannot tell how this GPT-2-style matrix is stored.*--layout",
    "base/model.safetensors",
)
def _(tmp: Path) -> list[str]:
    _gpt2(tmp, shapes={"attn.c_proj": (4, 4)})
    return [str(tmp / "base"), str(tmp / "tuned")]


case("only square c_proj, --layout conv1d", 0, check=STASHED_EXACT)(_layout_case({"attn.c_proj": (4, 4)}, True, ("--layout", "conv1d")))


# --- 1c. names that collide once wrapper prefixes go; zero and empty matrices; tied heads -------


@case(
    "tuned holds module.X and X", 2, r"two tensors are the same once wrapper prefixes.*'module\.model\.layers\.0", "tuned/model.safetensors"
)
def _(tmp: Path) -> list[str]:
    base = model()
    tuned = tuned_from(base)
    tuned["module." + name(0, "q_proj")] = tuned[name(0, "q_proj")] * 2
    pair(tmp, base, tuned)
    return [str(tmp / "base"), str(tmp / "tuned")]


@case("base holds _orig_mod.X and X", 2, r"two tensors are the same once wrapper prefixes", "base/model.safetensors")
def _(tmp: Path) -> list[str]:
    base = model()
    tuned = tuned_from(base)
    base["_orig_mod." + name(2, "v_proj")] = base[name(2, "v_proj")] + 1
    pair(tmp, base, tuned)
    return [str(tmp / "base"), str(tmp / "tuned")]


@case("tuned saved from DDP: every name under module.", 0, check=STASHED_EXACT)
def _(tmp: Path) -> list[str]:
    base = model()
    tuned = tuned_from(base)
    pair(tmp, base, {"module." + k: v for k, v in tuned.items()})
    _stash_refs(tmp, block_reference(base, tuned))
    return [str(tmp / "base"), str(tmp / "tuned")]


@case("an all-zero matrix on both sides: no dD, left out of n", 0, check=STASHED_EXACT)
def _(tmp: Path) -> list[str]:
    base = model()
    tuned = tuned_from(base)
    base[name(1, "q_proj")] = torch.zeros(SHAPE)
    tuned[name(1, "q_proj")] = torch.zeros(SHAPE)
    pair(tmp, base, tuned)
    _stash_refs(tmp, block_reference(base, tuned))
    return [str(tmp / "base"), str(tmp / "tuned")]


@case("a zero-initialised base matrix that training filled", 0, check=STASHED_EXACT)
def _(tmp: Path) -> list[str]:
    base = model()
    tuned = tuned_from(base)
    base[name(2, "v_proj")] = torch.zeros(SHAPE)
    pair(tmp, base, tuned)
    _stash_refs(tmp, block_reference(base, tuned))
    return [str(tmp / "base"), str(tmp / "tuned")]


def _empty(shape: tuple[int, int]) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        base = model(**{"model.layers.0.self_attn.k_proj.weight": torch.zeros(shape)})
        tuned = tuned_from(base)
        pair(tmp, base, tuned)
        _stash_refs(tmp, block_reference(base, tuned))  # the empty matrix is not a point
        return [str(tmp / "base"), str(tmp / "tuned")]

    return build


case("a matrix with no rows", 0, check=STASHED_EXACT)(_empty((0, 6)))
case("a matrix with no columns", 0, check=STASHED_EXACT)(_empty((6, 0)))


def _tied(tmp: Path, *, equal: bool, config: dict | None = None) -> list[str]:
    base = model()
    emb = base["model.embed_tokens.weight"]
    base["lm_head.weight"] = emb.clone() if equal else emb + 1
    tuned = tuned_from(base)
    tuned["lm_head.weight"] = tuned["model.embed_tokens.weight"]
    stored = {k: v for k, v in tuned.items() if k != "lm_head.weight"}  # what save_pretrained writes when tied
    pair(tmp, base, stored, config=config)
    _stash_refs(tmp, {"lm_head": reference(f64(base["lm_head.weight"]), f64(tuned["model.embed_tokens.weight"]))})
    return [str(tmp / "base"), str(tmp / "tuned"), "--modules", "lm_head"]


case("tied lm_head left out of the tuned file; base head equals its embedding", 0, check=STASHED_EXACT)(lambda tmp: _tied(tmp, equal=True))
case("tied lm_head left out; config.json says tie_word_embeddings", 0, check=STASHED_EXACT)(
    lambda tmp: _tied(tmp, equal=False, config={"model_type": "llama", "tie_word_embeddings": True})
)
case("untied base head and a tuned file without lm_head", 2, r"matrix missing from the tuned checkpoint", "tuned")(
    lambda tmp: _tied(tmp, equal=False)
)
case("config.json says untied and the tuned file lacks lm_head", 2, r"matrix missing from the tuned checkpoint", "tuned")(
    lambda tmp: _tied(tmp, equal=True, config={"model_type": "llama", "tie_word_embeddings": False})
)


# --- 2. every error names its input -------------------------------------------------------------


def _run_folder(tmp: Path, global_step: str) -> list[str]:
    base = model()
    save(tmp / "base", base)
    for step in (10, 20):
        ck = save(tmp / "run" / f"checkpoint-{step}", tuned_from(base, seed=step))
        (ck / "trainer_state.json").write_text('{"global_step": ' + (global_step if step == 20 else str(step)) + "}")
    return [str(tmp / "base"), str(tmp / "run")]


for _value in ("NaN", "Infinity", "-5", '"twenty"', "2.5"):
    case(f"trainer_state.json global_step {_value}", 2, r"global_step is", "checkpoint-20/trainer_state.json")(
        lambda tmp, v=_value: _run_folder(tmp, v)
    )


def _peft(tmp: Path, **changes: object) -> list[str]:
    from peft import LoraConfig

    base = model()
    save(tmp / "base", base)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]).to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    config.update(changes, base_model_name_or_path=None)
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for i in range(LAYERS):
        mod = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{mod}.lora_A.weight"] = torch.randn(2, SHAPE[1], generator=g)
        tensors[f"{mod}.lora_B.weight"] = torch.randn(SHAPE[0], 2, generator=g)
    folder = tmp / "adapter"
    save(folder, tensors, file="adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return [str(tmp / "base"), str(folder)]


for _field, _value, _says in (
    ("r", 0, "the rank must be a positive integer"),
    ("r", "eight", "the rank must be a positive integer"),
    ("r", None, "the rank must be a positive integer"),
    ("r", 2.5, "the rank must be a positive integer"),
    ("lora_alpha", None, "it must be a finite number"),
    ("lora_alpha", "four", "it must be a finite number"),
    ("rank_pattern", {"q_proj(": 4}, "rank_pattern key 'q_proj\\(' is not a valid regular expression"),
    ("alpha_pattern", {"[q": 4}, "alpha_pattern key '\\[q' is not a valid regular expression"),
    ("rank_pattern", ["q_proj"], "rank_pattern must be an object"),
):
    case(f"PEFT {_field} = {_value!r}", 2, _says, "adapter/adapter_config.json")(lambda tmp, f=_field, v=_value: _peft(tmp, **{f: v}))


def _kohya(tmp: Path, alpha: torch.Tensor) -> list[str]:
    base = model()
    save(tmp / "base", base)
    g = torch.Generator().manual_seed(6)
    tensors = {}
    for i in range(LAYERS):
        stem = f"lora_unet_model_layers_{i}_self_attn_q_proj"
        tensors[f"{stem}.lora_down.weight"] = torch.randn(2, SHAPE[1], generator=g)
        tensors[f"{stem}.lora_up.weight"] = torch.randn(SHAPE[0], 2, generator=g)
        tensors[f"{stem}.alpha"] = alpha.clone()
    save(tmp, tensors, file="lora.safetensors")
    return [str(tmp / "base"), str(tmp / "lora.safetensors")]


case("kohya alpha: an empty tensor", 2, r"alpha must be one number.*shape \[0\]", "lora.safetensors")(
    lambda tmp: _kohya(tmp, torch.zeros(0))
)
case("kohya alpha: NaN", 2, r"alpha is nan", "lora.safetensors")(lambda tmp: _kohya(tmp, torch.tensor(math.nan)))
case("kohya alpha: a vector", 2, r"alpha must be one number", "lora.safetensors")(lambda tmp: _kohya(tmp, torch.ones(3)))


def _index(tmp: Path, shard: str) -> list[str]:
    base = model()
    save(tmp / "base", base)
    folder = save(tmp / "tuned", tuned_from(base), file="part-1.safetensors")
    weight_map = {k: "part-1.safetensors" for k in base}
    weight_map[name(0, "q_proj")] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return [str(tmp / "base"), str(tmp / "tuned")]


case("an index that lists itself as a shard", 2, r"lists an index as a shard", "model.safetensors.index.json")(
    lambda tmp: _index(tmp, "model.safetensors.index.json")
)
case("an index that lists another index", 2, r"lists an index as a shard", "model.safetensors.index.json")(
    lambda tmp: _index(tmp, "other.index.json")
)
case("an index whose shard is missing", 2, r"shard listed in the index is missing", "missing.safetensors")(
    lambda tmp: _index(tmp, "missing.safetensors")
)


def _plain(*args: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        pair(tmp)
        return [str(tmp / "base"), str(tmp / "tuned"), *args]

    return build


case("--modules is not a regex", 2, r"--modules 'q_proj\(' is not a valid regular expression")(_plain("--modules", "q_proj("))
case("--modules with a bad escape", 2, r"is not a valid regular expression")(_plain("--modules", "\\"))
case("--device gpu", 2, r"unknown --device 'gpu'")(_plain("--device", "gpu"))
case("--device meta", 2, r"--device 'meta' is not supported")(_plain("--device", "meta"))
if not torch.cuda.is_available():
    case("--device cuda:3 without CUDA", 2, r"torch sees no CUDA device")(_plain("--device", "cuda:3"))


@case("a tuned path longer than PATH_MAX", 2, r"cannot look up this path \(File name too long\)", "tmp")
def _(tmp: Path) -> list[str]:
    pair(tmp)
    return [str(tmp / "base"), str(tmp) + "/" + "/".join(["d" * 200] * 25)]


@case("a base path with a component over NAME_MAX", 2, r"cannot look up this path \(File name too long\)", "xxxx")
def _(tmp: Path) -> list[str]:
    pair(tmp)
    return [str(tmp / ("x" * 300)), str(tmp / "tuned")]


@case("a symlink loop as the tuned path", 2, r"cannot look up this path \(Too many levels of symbolic links\)", "loop")
def _(tmp: Path) -> list[str]:
    pair(tmp)
    (tmp / "loop").symlink_to(tmp / "loop")
    return [str(tmp / "base"), str(tmp / "loop")]


@case("a truncated safetensors file", 2, r"", "tuned/model.safetensors")
def _(tmp: Path) -> list[str]:
    pair(tmp)
    f = tmp / "tuned" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-40])
    return [str(tmp / "base"), str(tmp / "tuned")]


@case("an empty model.safetensors", 2, r"", "model.safetensors")
def _(tmp: Path) -> list[str]:
    pair(tmp)
    (tmp / "tuned" / "model.safetensors").write_bytes(b"")
    return [str(tmp / "base"), str(tmp / "tuned")]


@case("a pickle that would run code", 2, r"refusing to load", "evil.bin")
def _(tmp: Path) -> list[str]:
    pair(tmp)
    torch.save({"w": torch.zeros(2, 2), "run": os.system}, tmp / "evil.bin")
    return [str(tmp / "base"), str(tmp / "evil.bin")]


@case("a truncated pytorch_model.bin", 2, r"not a readable PyTorch checkpoint", "pytorch_model.bin")
def _(tmp: Path) -> list[str]:
    base = model()
    save(tmp / "base", base)
    (tmp / "tuned").mkdir()
    torch.save(tuned_from(base), tmp / "tuned" / "pytorch_model.bin")
    f = tmp / "tuned" / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:200])
    return [str(tmp / "base"), str(tmp / "tuned")]


# --- 3. --out checked before any work -----------------------------------------------------------


def _out_case(make: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        pair(tmp)
        return [str(tmp / "base"), str(tmp / "tuned"), "--out", str(make(tmp))]

    return build


def _file(p: Path) -> Path:
    p.write_text("my notes\n")
    return p


case("--out is an existing file", 2, r"--out exists and is not a folder", "notes.txt")(_out_case(lambda t: _file(t / "notes.txt")))
case("--out under a parent that is a file", 2, r"its parent is a file", "notes.txt")(
    _out_case(lambda t: _file(t / "notes.txt") / "results")
)
case("--out is a broken symlink", 2, r"--out is a broken symlink", "dangling")(
    _out_case(lambda t: (t / "dangling").symlink_to(t / "nowhere") or t / "dangling")
)
case("--out with a name over NAME_MAX", 2, r"longer than the file system allows", "yyyy")(_out_case(lambda t: t / ("y" * 300)))


def _read_only(t: Path) -> Path:
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses even root
        return Path("/sys/dora-hostile-out")
    ro = t / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "results"


case("--out in a read-only place", 2, r"--out cannot be written", "")(_out_case(_read_only))


# --- 4. no hangs: only regular files are read ----------------------------------------------------


@case("a FIFO named model.safetensors", 2, r"not a regular file \(a FIFO\)", "tuned/model.safetensors")
def _(tmp: Path) -> list[str]:
    base = model()
    save(tmp / "base", base)
    (tmp / "tuned").mkdir()
    os.mkfifo(tmp / "tuned" / "model.safetensors")
    return [str(tmp / "base"), str(tmp / "tuned")]


@case("a FIFO given as the tuned file", 2, r"not a regular file \(a FIFO\)", "pipe.safetensors")
def _(tmp: Path) -> list[str]:
    pair(tmp)
    os.mkfifo(tmp / "pipe.safetensors")
    return [str(tmp / "base"), str(tmp / "pipe.safetensors")]


@case("/dev/zero linked as model.safetensors", 2, r"not a regular file \(a device\)", "model.safetensors")
def _(tmp: Path) -> list[str]:
    base = model()
    save(tmp / "base", base)
    (tmp / "tuned").mkdir()
    (tmp / "tuned" / "model.safetensors").symlink_to("/dev/zero")
    return [str(tmp / "base"), str(tmp / "tuned")]


@case("a FIFO as a shard of an index", 2, r"not a regular file", "part-2.safetensors")
def _(tmp: Path) -> list[str]:
    args = _index(tmp, "part-2.safetensors")
    os.mkfifo(tmp / "tuned" / "part-2.safetensors")
    return args


# --- 5. other formats seen in the wild are named --------------------------------------------------


def _lycoris(tmp: Path, algo: str) -> list[str]:
    from lycoris import create_lycoris

    base = model()
    save(tmp / "base", base)

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(6, 8)}) for _ in range(LAYERS))

    logging.disable(logging.CRITICAL)  # LyCORIS logs to the stream it first saw, maybe a closed capture
    try:
        net = create_lycoris(Tiny(), 1.0, linear_dim=2, linear_alpha=1.0, algo=algo)
        net.apply_to()
    finally:
        logging.disable(logging.NOTSET)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp / f"{algo}.safetensors")
    return [str(tmp / "base"), str(tmp / f"{algo}.safetensors")]


case("LyCORIS IA3", 2, r"LyCORIS IA3 \(weight \+ on_input\) is not supported", "ia3.safetensors")(lambda tmp: _lycoris(tmp, "ia3"))
case("LyCORIS GLoRA", 2, r"LyCORIS GLoRA \(a1 / a2 / b1 / b2\) is not supported", "glora.safetensors")(lambda tmp: _lycoris(tmp, "glora"))


# --- 6. training data -------------------------------------------------------------------------------


def _data(tmp: Path, name_: str, content: bytes) -> list[str]:
    (tmp / name_).write_bytes(content)
    return ["--method", "lora", "--data", str(tmp / name_), "--out", str(tmp / "out"), "--steps", "1"]


case(
    "CSV with a UTF-8 BOM: header read, bad label on line 3 named",
    2,
    r"line 3: label must be a non-negative integer",
    "d.csv",
    command="train",
)(lambda tmp: _data(tmp, "d.csv", b"\xef\xbb\xbftext,label\nfine film,1\nawful,x\n"))
case("CSV with Latin-1 bytes on line 3", 2, r"line 3: bytes that are not UTF-8", "d.csv", command="train")(
    lambda tmp: _data(tmp, "d.csv", b"text,label\nfine film,1\ncaf\xe9 au lait,0\n")
)
case("CSV label out of range", 2, r"line 2: label 1000000000 is out of range", "d.csv", command="train")(
    lambda tmp: _data(tmp, "d.csv", b"text,label\nfine film,1000000000\n")
)
case("CSV label negative", 2, r"line 2: label must be a non-negative integer, got '-1'", "d.csv", command="train")(
    lambda tmp: _data(tmp, "d.csv", b"text,label\nfine film,-1\n")
)
case("CSV label in full-width digits", 2, r"line 2: label must be a non-negative integer", "d.csv", command="train")(
    lambda tmp: _data(tmp, "d.csv", "text,label\nfine film,\uff11\n".encode())
)
case("JSONL with a BOM, line 2 out of range", 2, r"line 2: label 99999 is out of range", "d.jsonl", command="train")(
    lambda tmp: _data(tmp, "d.jsonl", b'\xef\xbb\xbf{"text": "a", "label": 0}\n{"text": "b", "label": 99999}\n')
)
case("JSONL with a huge integer label", 2, r"line 1: label \d+ is out of range", "d.jsonl", command="train")(
    lambda tmp: _data(tmp, "d.jsonl", b'{"text": "a", "label": 123456789012345678901234567890}\n')
)
case("UTF-16 CSV", 2, r"line 1: bytes that are not UTF-8", "d.csv", command="train")(
    lambda tmp: _data(tmp, "d.csv", "text,label\nfine,1\n".encode("utf-16"))
)


# --- the corpus, run ---------------------------------------------------------------------------------


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _exists(path: Path) -> bool:
    try:
        return path.exists() or path.is_symlink()
    except OSError:
        return False


def _listing(root: Path) -> dict[str, float]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.lstat().st_mtime for p in sorted(root.rglob("*"))}


def _leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if "staging" in p.name or ".probe-" in p.name]


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_hostile_input(c: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = c.build(tmp_path)
    out = tmp_path / "out"
    if "--out" not in argv:
        argv += ["--out", str(out)]
    out = Path(argv[argv.index("--out") + 1])
    watched = out if _is_dir(out) or not _exists(out) else out.parent
    if len(out.name) > 255:
        watched = out.parent
    before = _listing(watched) if _is_dir(watched) else {}
    main = analyze_main if c.command == "analyze" else train_main
    code = main([*argv, "--quiet", *(["--no-plots"] if c.command == "analyze" else [])])
    err = capsys.readouterr().err
    assert code == c.code, err
    assert "Traceback" not in err and "rerun with --debug" not in err, err
    assert not _leftovers(tmp_path), _leftovers(tmp_path)
    if c.code == 0:
        assert c.check is not None
        c.check(tmp_path, pd.read_csv(out / "layers.csv"))
        return
    lines = err.strip().splitlines()
    prog = "dora-analyze" if c.command == "analyze" else "dora-train"
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert re.search(c.message, lines[0]), lines[0]
    assert c.names in lines[0], lines[0]
    if _is_dir(watched):
        assert _listing(watched) == before, "a refused run changed --out"
    else:
        assert not _exists(watched)


def test_corpus_is_large_and_covers_every_class() -> None:
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.code for c in CASES} == {0, 2}
    assert sum(c.code == 0 for c in CASES) >= 15  # valid-but-unusual inputs, checked against numpy


def test_undefined_direction_is_said_not_silent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An all-zero matrix has no dD: the table leaves it empty, n leaves it out, and the command says so."""
    base = model()
    tuned = tuned_from(base)
    base[name(1, "q_proj")] = tuned[name(1, "q_proj")] = torch.zeros(SHAPE)
    pair(tmp_path, base, tuned)
    out = tmp_path / "out"
    assert analyze_main([str(tmp_path / "base"), str(tmp_path / "tuned"), "--out", str(out), "--quiet", "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "note: 1 point(s) have no direction" in err and "model.layers.1.self_attn.q_proj" in err
    summary = pd.read_csv(out / "summary.csv")
    assert int(summary[summary["kind"] == "all"]["n"].iloc[0]) == LAYERS * len(KINDS) - 1


# --- outputs: all or nothing ----------------------------------------------------------------------------


def _frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    """A real layers table and its summary, from a small analysis-shaped frame."""
    from dora_analysis import summarize

    layers = pd.DataFrame({
        "run": ["a"] * 3, "method": ["ft"] * 3, "step": [1] * 3, "module": ["l.0.q", "l.1.q", "l.2.q"], "layer": [0, 1, 2],
        "kind": ["q"] * 3, "rows": [4] * 3, "cols": [4] * 3, "delta_m": [1.0, 2.0, 3.0], "delta_d": [0.1, 0.3, 0.2],
        "delta_m_signed": [1.0, 2.0, 3.0], "base_norm": [1.0] * 3, "zero_rows": [0] * 3, "axis": ["out"] * 3,
    })  # fmt: skip
    return layers, summarize(layers, n_boot=0)


def test_rewrite_keeps_unknown_entries_and_switches_whole(tmp_path: Path) -> None:
    from dora_analysis.outputs import write_outputs

    layers, summary = _frames()
    out = tmp_path / "out"
    (out / ".cache").mkdir(parents=True)
    (out / ".cache" / "kept.csv").write_text("cache\n")
    (out / "figures").mkdir()
    (out / "figures" / "old.png").write_text("old figure")
    (out / "layers.csv").write_text("old\n")
    inode = (out / ".cache").stat().st_ino
    write_outputs(out, layers, summary, plots=False)
    assert (out / ".cache" / "kept.csv").read_text() == "cache\n" and (out / ".cache").stat().st_ino == inode
    assert not (out / "figures").exists(), "an old figure stayed beside a new report"
    assert pd.read_csv(out / "layers.csv")["module"].tolist() == ["l.0.q", "l.1.q", "l.2.q"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # through a symlink (another disk, say): the link stays, its target gets the results
    real = tmp_path / "elsewhere"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    write_outputs(tmp_path / "link", layers, summary, plots=False)
    assert (tmp_path / "link").is_symlink() and (real / "summary.csv").is_file()
    assert not _leftovers(tmp_path)


def test_inside_a_folder_that_cannot_be_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mount point (or a folder in a read-only parent) is updated entry by entry, staged inside itself."""
    from dora_analysis import outputs

    monkeypatch.setattr(outputs.os.path, "ismount", lambda p: Path(p) == tmp_path / "mnt")
    layers, summary = _frames()
    out = tmp_path / "mnt"
    out.mkdir()
    (out / "layers.csv").write_text("old\n")
    (out / "keep.txt").write_text("mine\n")
    outputs.write_outputs(out, layers, summary, plots=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "layers.csv", "report.html", "report.md", "summary.csv", "summary.json"]
    assert "old" not in (out / "layers.csv").read_text()


def test_out_holding_the_current_directory_keeps_its_inode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out .`: the folder a shell stands in is updated in place, never renamed away from under it."""
    from dora_analysis.outputs import write_outputs

    out = tmp_path / "here"
    out.mkdir()
    (out / "layers.csv").write_text("old\n")
    inode = out.stat().st_ino
    monkeypatch.chdir(out)
    write_outputs(Path("."), *_frames(), plots=False)
    assert out.stat().st_ino == inode and Path.cwd() == out
    assert "l.2.q" in (out / "layers.csv").read_text() and not _leftovers(tmp_path)


def test_failed_switch_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dora_analysis import outputs

    layers, summary = _frames()
    out = tmp_path / "out"
    (out / ".cache").mkdir(parents=True)
    (out / "layers.csv").write_text("old\n")

    def broken(a: Path, b: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "_exchange", broken)
    with pytest.raises(OSError):
        outputs.write_outputs(out, layers, summary, plots=False)
    assert sorted(p.name for p in out.iterdir()) == [".cache", "layers.csv"] and (out / "layers.csv").read_text() == "old\n"
    assert not _leftovers(tmp_path)


def test_truncated_optimizer_state_is_named(tmp_path: Path) -> None:
    """--resume reads optimizer.pt: a truncated one is one line naming it."""
    from dora_analysis.errors import InputError
    from dora_analysis.train.checkpoint import _restore

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    path = tmp_path / "checkpoint-10" / "optimizer.pt"
    path.parent.mkdir()
    torch.save(opt.state_dict(), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(InputError, match=r"checkpoint-10/optimizer\.pt: truncated or corrupt resume state") as info:
        _restore(path, opt.load_state_dict)
    assert "\n" not in str(info.value)
    torch.save({"state": {}, "param_groups": [{"params": [0, 1, 2]}]}, path)  # another run's optimizer
    with pytest.raises(InputError, match=r"optimizer\.pt: resume state does not fit this run"):
        _restore(path, opt.load_state_dict)


def test_bom_csv_reads_like_plain_csv(tmp_path: Path) -> None:
    from dora_analysis.train.data import read_examples

    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbftext,label\nfine film,1\ndull,0\n")
    (tmp_path / "plain.csv").write_bytes(b"text,label\nfine film,1\ndull,0\n")
    assert read_examples(tmp_path / "bom.csv") == read_examples(tmp_path / "plain.csv")


def test_int8_matches_bitsandbytes_itself(tmp_path: Path) -> None:
    """The formula above against bitsandbytes' own Linear8bitLt state dict and dequantization."""
    bnb = pytest.importorskip("bitsandbytes")
    from dora_analysis.containers import open_checkpoint

    w = torch.randn(*SHAPE)
    layer = bnb.nn.Linear8bitLt(SHAPE[1], SHAPE[0], has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    state = {f"model.layers.0.q.{k}": v for k, v in layer.to("cpu").state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "m.safetensors")
    got = open_checkpoint(tmp_path / "m.safetensors").get("model.layers.0.q.weight")
    codes, scb = state["model.layers.0.q.weight"], state["model.layers.0.q.SCB"]
    assert torch.equal(got, bnb.functional.int8_vectorwise_dequant(codes, scb))
    assert np.allclose(f64(got), bnb_dequant(codes, scb), rtol=1e-6)
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(bnb_int8(w), (codes, scb), strict=True))  # the corpus's quantizer


# --- signals and exit hooks: real processes -------------------------------------------------------------


SCRIPT = """
import sys
from dora_analysis.console import run_main

def body():
    import time
    from pathlib import Path
    import pandas as pd
    from dora_analysis import outputs, report

    real = report.write_report
    def slow(*a, **k):
        out = real(*a, **k)
        print("staged", flush=True)
        time.sleep(float(sys.argv[2]))
        return out
    report.write_report = slow
    layers = pd.DataFrame({"run": ["a"] * 3, "method": ["ft"] * 3, "step": [1] * 3, "module": ["l.0.q", "l.1.q", "l.2.q"],
                           "layer": [0, 1, 2], "kind": ["q"] * 3, "delta_m": [1.0, 2.0, 3.0], "delta_d": [0.1, 0.3, 0.2]})
    summary = pd.DataFrame({"run": ["a"], "method": ["ft"], "kind": ["all"], "n": [3], "pearson_r": [0.5]})
    outputs.write_outputs(Path(sys.argv[1]), layers, summary, plots=False)
    return 0

sys.exit(run_main("dora-analyze", body, standalone=True))
"""


def _spawn(out: Path, pause: float) -> subprocess.Popen[str]:
    root = Path(__file__).resolve().parent.parent
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(out), str(pause)], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_while_staging_leaves_the_old_folder(tmp_path: Path, signum: int, code: int) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "layers.csv").write_text("old\n")
    (out / ".cache").mkdir()
    proc = _spawn(out, 30)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "staged"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.strip().splitlines() == [f"dora-analyze: {'interrupted' if signum == signal.SIGINT else 'stopped by SIGTERM'}"]
    assert sorted(p.name for p in out.iterdir()) == [".cache", "layers.csv"] and (out / "layers.csv").read_text() == "old\n"
    assert not _leftovers(tmp_path)


def test_signals_at_random_moments_leave_old_or_new(tmp_path: Path) -> None:
    """Kill a real write at spread-out moments: each time the folder is whole (old or new), never mixed."""
    out = tmp_path / "out"
    for i, delay in enumerate((0.3, 1.5, 2.5, 3.5)):
        shutil_rm(out)
        out.mkdir()
        (out / "layers.csv").write_text("old\n")
        proc = _spawn(out, 0)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM if i % 2 else signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err and "Exception ignored" not in err, err
        names = sorted(p.name for p in out.iterdir())
        old = names == ["layers.csv"] and (out / "layers.csv").read_text() == "old\n"
        new = {"layers.csv", "summary.csv", "summary.json", "report.md", "report.html"} <= set(names) and "l.2.q" in (
            out / "layers.csv"
        ).read_text()
        assert old or new, (delay, names)
        assert not _leftovers(tmp_path), _leftovers(tmp_path)


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
