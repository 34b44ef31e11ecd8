"""The project's LoRA / DoRA layers: init, the expanded row norm, the detach, and PEFT as oracle."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from dora_analysis.train.layers import DoRALinear, LoRALinear

# (name, base layer factory, rslora): one list of cases for every check below.
CASES = [
    ("linear", lambda: nn.Linear(12, 20), False),
    ("linear-rslora", lambda: nn.Linear(12, 20), True),
    ("linear-nobias", lambda: nn.Linear(16, 7, bias=False), False),
    ("conv1d", lambda: Conv1D(20, 12), False),  # GPT-2 layout: weight [in, out]
]
RANK, ALPHA = 4, 8.0


def _perturb(layer: LoRALinear) -> None:
    """Give the adapter non-trivial weights (B = 0 at init would make every check vacuous)."""
    with torch.no_grad():
        layer.lora_B.weight.normal_(0.0, 0.3)
        if isinstance(layer, DoRALinear):
            layer.magnitude.mul_(1.0 + 0.2 * torch.randn_like(layer.magnitude))


def _reference_dora(layer: DoRALinear, x: torch.Tensor) -> torch.Tensor:
    """Paper eq. 5, written out with the full matrix and the norm detached (section 4.3)."""
    w0 = layer.base_weight()
    v = w0 + layer.scaling * (layer.lora_B.weight @ layer.lora_A.weight)
    norm = torch.linalg.norm(v, dim=1).detach()
    w = layer.magnitude[:, None] * v / norm[:, None]
    return F.linear(x, w, layer.base_layer.bias)


@pytest.mark.parametrize("name, make, rslora", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_adapter_starts_equal_to_base(name: str, make, rslora: bool, cls: type[LoRALinear]) -> None:
    base = make()
    in_features = base.weight.shape[0] if isinstance(base, Conv1D) else base.weight.shape[1]
    x = torch.randn(3, 5, in_features)
    expected = base(x)
    layer = cls(base, rank=RANK, alpha=ALPHA, rslora=rslora)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.count_nonzero(layer.lora_A.weight) == layer.lora_A.weight.numel()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    if isinstance(layer, DoRALinear):
        torch.testing.assert_close(layer.magnitude.detach(), torch.linalg.norm(layer.base_weight(), dim=1))


def test_scaling_and_frozen_base() -> None:
    layer = LoRALinear(nn.Linear(8, 8), rank=4, alpha=16.0, rslora=False)
    assert layer.scaling == 4.0
    assert LoRALinear(nn.Linear(8, 8), rank=4, alpha=16.0, rslora=True).scaling == 8.0
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad


@pytest.mark.parametrize("name, make, rslora", CASES, ids=[c[0] for c in CASES])
def test_expanded_row_norm_equals_explicit(name: str, make, rslora: bool) -> None:
    layer = DoRALinear(make(), rank=RANK, alpha=ALPHA, rslora=rslora)
    _perturb(layer)
    explicit = torch.linalg.norm(layer.base_weight() + layer.delta_weight(), dim=1)
    torch.testing.assert_close(layer.weight_norm(), explicit.detach(), rtol=1e-5, atol=1e-6)
    assert not layer.weight_norm().requires_grad  # section 4.3: a constant in backprop


def test_zero_row_stays_zero_not_nan() -> None:
    base = nn.Linear(6, 4)
    with torch.no_grad():
        base.weight[2].zero_()
    layer = DoRALinear(base, rank=2, alpha=4.0)
    out = layer(torch.randn(3, 6))
    assert torch.isfinite(out).all()
    assert torch.isfinite(layer.merged_weight()).all()


@pytest.mark.parametrize("name, make, rslora", CASES, ids=[c[0] for c in CASES])
def test_dora_forward_and_grads_match_paper_formula(name: str, make, rslora: bool) -> None:
    layer = DoRALinear(make(), rank=RANK, alpha=ALPHA, rslora=rslora)
    _perturb(layer)
    in_features = layer.base_weight().shape[1]
    x = torch.randn(2, 3, in_features)
    ours = layer(x)
    ours.square().sum().backward()
    grads = [p.grad.clone() for p in (layer.lora_A.weight, layer.lora_B.weight, layer.magnitude)]
    layer.zero_grad()
    ref = _reference_dora(layer, x)
    ref.square().sum().backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for got, p in zip(grads, (layer.lora_A.weight, layer.lora_B.weight, layer.magnitude)):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, make, rslora", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_merged_weight_reproduces_forward(name: str, make, rslora: bool, cls: type[LoRALinear]) -> None:
    layer = cls(make(), rank=RANK, alpha=ALPHA, rslora=rslora)
    _perturb(layer)
    merged = layer.merged_weight()
    assert merged.shape == layer.base_layer.weight.shape  # the base's own layout
    x = torch.randn(4, layer.base_weight().shape[1])
    w = merged.T if layer.fan_in_fan_out else merged
    torch.testing.assert_close(F.linear(x, w, layer.base_layer.bias), layer(x), rtol=1e-5, atol=1e-5)


def test_magnitude_only_trains_m_alone() -> None:
    layer = DoRALinear(nn.Linear(10, 6), rank=2, alpha=4.0, magnitude_only=True)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["magnitude"]
    layer(torch.randn(3, 10)).sum().backward()
    assert layer.magnitude.grad is not None and layer.lora_B.weight.grad is None
    with torch.no_grad():
        layer.magnitude.mul_(2.0)  # W' = m W0 / ||W0||: rows rescale, directions stay
    torch.testing.assert_close(layer.merged_weight(), 2.0 * layer.base_layer.weight)


# --- PEFT as an independent oracle ---------------------------------------------------------------


def _peft_twin(ours: LoRALinear, rslora: bool):
    """The same layer built by PEFT (lora.Linear), holding exactly our weights."""
    peft = pytest.importorskip("peft", reason="peft is the oracle for the DoRA layer; install the dev extras")
    fan_in_fan_out = ours.fan_in_fan_out
    base = nn.Sequential()
    base.add_module("proj", ours.base_layer)
    config = peft.LoraConfig(
        r=ours.rank, lora_alpha=ALPHA, target_modules=["proj"], use_dora=isinstance(ours, DoRALinear),
        use_rslora=rslora, fan_in_fan_out=fan_in_fan_out, lora_dropout=0.0,
    )  # fmt: skip
    twin = peft.get_peft_model(base, config).base_model.model.proj
    with torch.no_grad():
        twin.lora_A["default"].weight.copy_(ours.lora_A.weight)
        twin.lora_B["default"].weight.copy_(ours.lora_B.weight)
        if isinstance(ours, DoRALinear):
            twin.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    return twin


@pytest.mark.parametrize("name, make, rslora", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_forward_and_grads_match_peft(name: str, make, rslora: bool, cls: type[LoRALinear]) -> None:
    ours = cls(make(), rank=RANK, alpha=ALPHA, rslora=rslora)
    _perturb(ours)
    twin = _peft_twin(ours, rslora)
    assert math.isclose(twin.scaling["default"], ours.scaling)
    x = torch.randn(2, 5, ours.base_weight().shape[1])
    out_ours, out_peft = ours(x), twin(x)
    torch.testing.assert_close(out_ours, out_peft, rtol=0, atol=1e-5)

    out_ours.square().sum().backward()
    out_peft.square().sum().backward()
    pairs = [(ours.lora_A.weight, twin.lora_A["default"].weight), (ours.lora_B.weight, twin.lora_B["default"].weight)]
    if isinstance(ours, DoRALinear):
        pairs.append((ours.magnitude, twin.lora_magnitude_vector["default"].weight))
    for mine, theirs in pairs:
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-5)
