"""Adapter formats other than PEFT LoRA, against hand-written merges; and bad adapters.

The official DoRA layout and kohya / LyCORIS files are built here tensor by tensor; each
expected W' is written out the way that code base writes its merge, independently of
``dora_analysis.adapters.merge``. VeRA adapters are made by PEFT.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dora_analysis.adapters import base_path_of, open_adapter
from dora_analysis.analysis import analyze
from dora_analysis.cli.analyze import main
from dora_analysis.containers import open_checkpoint
from dora_analysis.errors import InputError

P = "base_model.model."  # PEFT's key prefix


def save_base(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    return folder


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


# -- official DoRA layout -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_official_dora_layout_matches_its_merge(tmp_path: Path, dtype: torch.dtype) -> None:
    q0, v0 = torch.randn(12, 8), torch.randn(8, 8)
    q0[3] = 0.0  # a zero row, whose update is zero too: PEFT's merge would give 0 / 0 there
    base = save_base(tmp_path / "base", {"model.layers.0.q.weight": q0.to(dtype), "model.layers.0.v.weight": v0.to(dtype)})
    a, b = torch.randn(2, 8), torch.randn(12, 2)
    b[3] = 0.0
    m_q, m_v = torch.rand(12, 1) + 0.5, torch.rand(8, 1) + 0.5
    adapter = tmp_path / "official"
    adapter.mkdir()
    tensors = {
        f"{P}model.layers.0.q.lora_A.weight": a,
        f"{P}model.layers.0.q.lora_B.weight": b,
        f"{P}model.layers.0.q.weight_m_wdecomp.weight": m_q,
        f"{P}model.layers.0.v.weight_m_wdecomp.weight": m_v,  # Wdecompose: magnitude only
    }
    torch.save({k: v.to(dtype) for k, v in tensors.items()}, adapter / "adapter_model.bin")
    config = {
        "peft_type": "DORA", "r": 2, "lora_alpha": 6, "target_modules": ["q"], "Wdecompose_target_modules": ["v"],
        "dora_simple": True, "fan_in_fan_out": False, "base_model_name_or_path": str(base),
    }  # fmt: skip
    (adapter / "adapter_config.json").write_text(json.dumps(config))

    snap = open_adapter(adapter)
    assert snap is not None and snap.method == "dora"
    assert base_path_of(adapter) == base
    store = open_checkpoint(base)
    assert snap.bind(store) == {"model.layers.0.q.weight", "model.layers.0.v.weight"}
    # The official code: new_weight_v = W + (B @ A) * scaling; m / ||new_weight_v||_row * new_weight_v.
    up = lambda t: t.to(dtype).float()  # noqa: E731 - what the file holds, upcast
    new_v = up(q0) + up(b) @ up(a) * (6 / 2)
    expected_q = up(m_q) / torch.linalg.norm(new_v, dim=1).unsqueeze(1) * new_v
    expected_q[3] = 0.0
    expected_v = up(m_v) / torch.linalg.norm(up(v0), dim=1).unsqueeze(1) * up(v0)
    assert_close(snap.weight("model.layers.0.q.weight", store.get("model.layers.0.q.weight")), expected_q)
    assert_close(snap.weight("model.layers.0.v.weight", store.get("model.layers.0.v.weight")), expected_v)

    (adapter / "adapter_config.json").unlink()
    with pytest.raises(InputError, match="no adapter_config.json beside the adapter weights"):
        open_adapter(adapter)


# -- kohya / LyCORIS ------------------------------------------------------------------------------

KOHYA_MODULES = {  # base module -> (kohya stem, [out, in, *kernel])
    "down_blocks.0.attentions.0.proj_in": ("lora_unet_down_blocks_0_attentions_0_proj_in", (12, 8)),
    "down_blocks.0.attentions.0.to_q": ("lora_unet_down_blocks_0_attentions_0_to_q", (8, 8)),
    "conv_in": ("lora_unet_conv_in", (6, 4, 3, 3)),
}


def lycoris_merge(
    w0: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: float, dora_scale: torch.Tensor | None, wd_on_out: bool
) -> torch.Tensor:
    """LyCORIS's LoCon merge and ``apply_weight_decompose``, written out."""
    weight = w0 + (up.flatten(1) @ down.flatten(1)).reshape(w0.shape) * (alpha / down.shape[0])
    if dora_scale is None:
        return weight
    dims = [1] * (weight.dim() - 1)
    if wd_on_out:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *dims)
    else:
        norm = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1, keepdim=True).reshape(weight.shape[1], *dims).transpose(0, 1)
    return weight * (dora_scale / (norm + torch.finfo(weight.dtype).eps))


def kohya_fixture(root: Path, axis: str | None, *, flat_square: bool = False) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A base and a kohya file over it; returns the expected W' per base tensor.

    Args:
        axis: None (plain LoRA), "out" (dora_scale [out, 1, ...]) or "in" ([1, in, ...]).
        flat_square: Store the square matrix's dora_scale flattened ([n]): ambiguous.
    """
    base_tensors, tensors, expected = {}, {}, {}
    for i, (module, (stem, shape)) in enumerate(KOHYA_MODULES.items()):
        w0 = torch.randn(shape)
        base_tensors[f"{module}.weight"] = w0
        down, up = torch.randn(2, *shape[1:]), torch.randn(shape[0], 2, *[1] * (len(shape) - 2))
        alpha = 3.0 if i else 2.0  # i == 0: no alpha stored, which means alpha = r
        tensors |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
        if i:
            tensors[f"{stem}.alpha"] = torch.tensor(alpha)
        scale = None
        if axis is not None:
            sizes = [shape[0]] + [1] * (len(shape) - 1) if axis == "out" else [1, shape[1]] + [1] * (len(shape) - 2)
            scale = torch.rand(sizes) + 0.5
            stored = scale.flatten() if flat_square and shape == (8, 8) else scale
            tensors[f"{stem}.dora_scale"] = stored
        expected[f"{module}.weight"] = lycoris_merge(w0, down, up, alpha, scale, wd_on_out=axis == "out")
    base = save_base(root / "base", base_tensors)
    (root / "lora").mkdir()
    save_file(tensors, root / "lora" / "network.safetensors")
    return base, root / "lora" / "network.safetensors", expected


@pytest.mark.parametrize("axis", [None, "out", "in"], ids=["lora", "dora-out-lycoris>=3.2", "dora-in-lycoris<3.2"])
def test_kohya_lycoris_matches_its_merge(tmp_path: Path, axis: str | None) -> None:
    base, file, expected = kohya_fixture(tmp_path, axis)
    for path in (file, file.parent):  # the file, or a folder holding only it
        snap = open_adapter(path)
        assert snap is not None and snap.method == ("lora" if axis is None else "dora")
        store = open_checkpoint(base)
        assert snap.bind(store) == set(expected)
        for name, want in expected.items():
            assert_close(snap.weight(name, store.get(name)), want)


def test_kohya_flattened_square_dora_scale_needs_the_axis(tmp_path: Path) -> None:
    base, file, expected = kohya_fixture(tmp_path, "in", flat_square=True)
    with pytest.raises(InputError, match=r"square matrix.*dora_axis='out'.*--dora-scale-axis") as info:
        open_adapter(file)
    assert "network.safetensors" in str(info.value) and "to_q.dora_scale" in str(info.value)
    with pytest.raises(InputError, match="runs along the 'in' features, but dora_axis='out' was given"):
        open_adapter(file, reader_options={"dora_axis": "out"})  # the [1, in] scales of the other layers contradict it
    snap = open_adapter(file, reader_options={"dora_axis": "in"})
    store = open_checkpoint(base)
    snap.bind(store)
    name = "down_blocks.0.attentions.0.to_q.weight"
    assert_close(snap.weight(name, store.get(name)), expected[name])
    # The analyzer passes its reader options through (the CLI's --dora-scale-axis).
    df = analyze(base, file, modules="to_q", reader_options={"dora_axis": "in"})
    assert list(df["module"]) == ["down_blocks.0.attentions.0.to_q"] and list(df["method"]) == ["dora"]


def test_kohya_other_lycoris_algorithms_are_refused(tmp_path: Path) -> None:
    save_file(
        {"lora_unet_conv_in.hada_w1_a": torch.randn(4, 2), "lora_unet_conv_in.alpha": torch.tensor(1.0)}, tmp_path / "loha.safetensors"
    )
    with pytest.raises(InputError, match="LyCORIS LoHa"):
        open_adapter(tmp_path / "loha.safetensors")


class Blocks(torch.nn.Module):
    """Two blocks of two linear layers, as LyCORIS names them on a plain torch model."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.ModuleDict({"q": torch.nn.Linear(6, 5), "v": torch.nn.Linear(6, 5)}) for _ in range(2)])


def test_lycoris_full_differences_are_dense_updates(tmp_path: Path) -> None:
    """LyCORIS `full` saves diff / diff_b; LyCORIS's own merge is the oracle, and so is W0 + diff."""
    lycoris = pytest.importorskip("lycoris", reason="LyCORIS writes the full-difference files: pip install lycoris-lora")
    model = Blocks()
    base = tmp_path / "base.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, base)
    lycoris.LycorisNetwork.apply_preset({"target_name": [r".*\.q", r".*\.v"]})
    net = lycoris.create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo="full")
    net.apply_to()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    file = tmp_path / "full.safetensors"
    net.save_weights(str(file), torch.float32, None)
    diffs = load_file(file)
    assert {k.rsplit(".", 1)[1] for k in diffs} == {"diff", "diff_b"}
    merged = {}
    for module in net.loras:  # LyCORIS's own merge, module by module
        weight, bias = module.get_merged_weight(multiplier=1.0)
        path = module.lora_name.removeprefix("lycoris_").replace("_", ".")
        merged[f"{path}.weight"], merged[f"{path}.bias"] = weight.detach(), bias.detach()

    snap = open_adapter(file)
    store = open_checkpoint(base)
    assert snap.method == "ft" and snap.bind(store) == set(merged)
    for name, want in merged.items():
        got = snap.weight(name, store.get(name))
        assert_close(got, want)
        stem = "lycoris_" + name.rsplit(".", 1)[0].replace(".", "_")
        delta = diffs[f"{stem}.diff"] if name.endswith(".weight") else diffs[f"{stem}.diff_b"]
        assert torch.equal(got, store.get(name) + delta)
    df = analyze(base, file, modules=r"\.q$")
    assert list(df["method"]) == ["ft", "ft"] and len(df) == 2


# -- PEFT VeRA -------------------------------------------------------------------------------------


class TwoLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 12)
        self.b = torch.nn.Linear(12, 6)


@pytest.mark.parametrize("save_projection", [True, False], ids=["saved-projections", "regenerated-projections"])
def test_vera_matches_hand_merge_and_peft(tmp_path: Path, save_projection: bool) -> None:
    peft = pytest.importorskip("peft", reason="PEFT makes the VeRA adapters: pip install peft")
    model = TwoLinear()
    base = save_base(tmp_path / "base", model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not saving the projections" notice
        config = peft.VeraConfig(r=4, target_modules=["a", "b"], save_projection=save_projection, projection_prng_key=3)
        vera = peft.get_peft_model(model, config)
        with torch.no_grad():
            for name, p in vera.named_parameters():
                if "vera_lambda" in name:
                    p.add_(torch.randn_like(p))
        vera.save_pretrained(tmp_path / "vera")
    # PEFT's own projections, from the live model: the regenerated ones must equal them.
    vera_a, vera_b = vera.base_model.vera_A["default"], vera.base_model.vera_B["default"]
    layers = {n: vera.base_model.model.get_submodule(n) for n in ("a", "b")}
    merged = vera.merge_and_unload().state_dict()

    snap = open_adapter(tmp_path / "vera")
    assert snap is not None and snap.method == "vera"
    store = open_checkpoint(base)
    assert snap.bind(store) == {"a.weight", "b.weight"}
    for n, layer in layers.items():
        w0 = store.get(f"{n}.weight")
        lambda_b, lambda_d = layer.vera_lambda_b["default"].detach(), layer.vera_lambda_d["default"].detach()
        out, inp = w0.shape
        expected = w0 + (lambda_b[:, None] * vera_b[:out]) @ (lambda_d[:, None] * vera_a[:, :inp])
        actual = snap.weight(f"{n}.weight", w0)
        assert_close(actual, expected)
        assert_close(actual, merged[f"{n}.weight"])


# -- bad adapters ------------------------------------------------------------------------------------

BASE = {"layers.0.q.weight": (12, 8), "layers.0.q.bias": (12,)}
LORA = {f"{P}layers.0.q.lora_A.weight": (2, 8), f"{P}layers.0.q.lora_B.weight": (12, 2)}
LORA_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]}


@pytest.mark.parametrize(
    "config, tensors, stage, message",
    [
        pytest.param({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}, {"prompt_embeddings": (4, 8)}, "open",
                     "PROMPT_TUNING adapters .* leave the model's weights unchanged, so the magnitude / direction changes dM and dD do not apply",
                     id="prompt-tuning"),
        pytest.param({"peft_type": "PREFIX_TUNING"}, {"prompt_embeddings": (4, 8)}, "open", "PREFIX_TUNING adapters", id="prefix-tuning"),
        pytest.param(None, LORA, "open", "no adapter_config.json beside the adapter weights", id="missing-config"),
        pytest.param("{not json", LORA, "open", "unreadable adapter config", id="unreadable-config"),
        pytest.param({"peft_type": "IA3"}, LORA, "open", "PEFT adapter type IA3 is not supported", id="unsupported-type"),
        pytest.param(LORA_CONFIG | {"init_lora_weights": "pissa"}, LORA, "open", "rewrote the base weights", id="pissa-init"),
        pytest.param(LORA_CONFIG | {"r": 4}, LORA, "open", r"rank 2 in the file, but r=4", id="rank-mismatch"),
        pytest.param(LORA_CONFIG, LORA | {f"{P}layers.0.q.lora_B.bias": (3,)}, "open", r"lora_B.bias has shape \[3\]", id="bad-lora-bias"),
        pytest.param(LORA_CONFIG, {f"{P}layers.0.k.lora_A.weight": (2, 8), f"{P}layers.0.k.lora_B.weight": (12, 2)}, "bind",
                     r"the adapter changes 'layers.0.k.weight', which the base does not have", id="module-base-lacks"),
        pytest.param(LORA_CONFIG, {f"{P}layers.0.q.lora_A.weight": (2, 8), f"{P}layers.0.q.lora_B.weight": (10, 2)}, "bind",
                     r"shape mismatch: the adapter's update is \[10, 8\], the base's layers.0.q.weight is \[12, 8\]", id="shape-mismatch"),
        pytest.param(LORA_CONFIG | {"modules_to_save": ["q"]}, {f"{P}layers.0.q.bias": (5,)}, "bind",
                     r"shape mismatch: the adapter has \[5\], the base's layers.0.q.bias is \[12\]", id="saved-module-shape"),
    ],
)  # fmt: skip
def test_bad_adapters_say_what_and_where(tmp_path: Path, config: dict | str | None, tensors: dict, stage: str, message: str) -> None:
    base = save_base(tmp_path / "base", {k: torch.randn(s) for k, s in BASE.items()})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({k: torch.randn(s) for k, s in tensors.items()}, adapter / "adapter_model.safetensors")
    if config is not None:
        (adapter / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(InputError, match=message) as info:
        snap = open_adapter(adapter)
        assert stage == "bind" and snap is not None
        snap.bind(open_checkpoint(base))
    text = str(info.value)
    assert "\n" not in text and str(adapter) in text
    if stage == "bind":
        assert "adapter_model.safetensors [base_model.model.layers.0." in text  # file and tensor
    # The CLI says the same in one line and exits 2.
    assert main([str(base), str(adapter), "--quiet", "--no-plots"]) == 2


@pytest.mark.parametrize(
    "base_prefix, adapter_prefix",
    [("model.", ""), ("", "model.")],
    ids=["base-saved-with-wrapper", "adapter-trained-on-wrapper"],
)
def test_peft_names_match_across_a_leading_prefix(tmp_path: Path, base_prefix: str, adapter_prefix: str) -> None:
    """E.g. an adapter of XForCausalLM (``model.layers...``) on a base saved from XModel (``layers...``)."""
    w0 = torch.randn(12, 8)
    base = save_base(tmp_path / "base", {f"{base_prefix}layers.0.q.weight": w0, f"{base_prefix}layers.1.q.weight": torch.randn(12, 8)})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    a, b = torch.randn(2, 8), torch.randn(12, 2)
    save_file(
        {f"{P}{adapter_prefix}layers.0.q.lora_A.weight": a, f"{P}{adapter_prefix}layers.0.q.lora_B.weight": b},
        adapter / "adapter_model.safetensors",
    )
    (adapter / "adapter_config.json").write_text(json.dumps(LORA_CONFIG))
    snap = open_adapter(adapter)
    store = open_checkpoint(base)
    assert snap.bind(store) == {f"{base_prefix}layers.0.q.weight"}
    assert_close(snap.weight(f"{base_prefix}layers.0.q.weight", w0), w0 + b @ a * (4 / 2))


def test_full_checkpoints_are_not_adapters(tmp_path: Path) -> None:
    base = save_base(tmp_path / "base", {k: torch.randn(s) for k, s in BASE.items()})
    assert open_adapter(base) is None
    assert open_adapter(base / "model.safetensors") is None
    assert base_path_of(base) is None
