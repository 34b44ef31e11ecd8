"""The spectral metrics on PEFT LoRA adapters of a tiny Llama: PEFT's own intruder detector and a
float64 numpy computation as oracles, the base decomposed once per matrix, pairs.csv end to end."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dora_analysis import spectral as sp
from dora_analysis.analysis import analyze, subspace_pairs, update_spectra

from .conftest import write_trainer_state

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
MODULE_RE = "|".join(TARGETS)


def tiny_llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=32, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=16,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def perturb(peft_model: torch.nn.Module, seed: int) -> None:
    """LoRA factors as after training: B nonzero; some modules changed far more than others,
    so some grow intruders and some do not."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                big = 8.0 if ("q_proj" in name or "up_proj" in name) else 0.3
                param.copy_(torch.randn(param.shape, generator=gen) * (big if "lora_B" in name else 1.0) / param.shape[-1] ** 0.5)


@pytest.fixture
def lora_run(tmp_path: Path) -> tuple[Path, Path, torch.nn.Module]:
    """A base tiny Llama and a run of three PEFT LoRA checkpoints; returns the last PEFT model."""
    model = tiny_llama()
    base = tmp_path / "base"
    model.save_pretrained(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    peft_model = peft.get_peft_model(model, config)
    run = tmp_path / "runs" / "lora"
    for step in (10, 20, 30):
        perturb(peft_model, step)
        folder = run / f"checkpoint-{step}"
        peft_model.save_pretrained(folder)
        write_trainer_state(folder, step)
    return base, run, peft_model


def peft_intruders(peft_model: torch.nn.Module, k: int, eps: float) -> dict[str, int]:
    """PEFT's detector on the model as loaded: module -> intruder count, from its log lines."""
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    lines: list[str] = []
    reduce_intruder_dimension(peft_model, top_k=k, threshold_epsilon=eps, logging_sink=lines.append)
    counts = {}
    for line in lines:
        found = re.match(r"(.+): (?:Intruders: (\d+)|No intruders)$", line)
        if found:
            module = found.group(1).split("base_model.model.", 1)[-1]
            counts[module] = int(found.group(2) or 0)
    return counts


@pytest.mark.parametrize(("k", "eps"), [(10, 0.5), (4, 0.3)])
def test_intruder_counts_equal_peft_detector(lora_run: tuple[Path, Path, torch.nn.Module], k: int, eps: float) -> None:
    base, run, peft_model = lora_run
    layers = analyze(base, run, steps=[30], modules=MODULE_RE, metrics=["intruders"], metric_options={"intruder_k": k, "intruder_eps": eps})
    ours = dict(zip(layers["module"], layers["intruders"], strict=True))
    expected = peft_intruders(peft_model, k, eps)
    assert set(ours) == set(expected)
    assert ours == expected
    assert 0 < sum(ours.values()) < len(ours) * k, "the case should have intruders in some modules, not all"


def test_spectra_and_amplification_match_numpy_float64(lora_run: tuple[Path, Path, torch.nn.Module]) -> None:
    base, run, _ = lora_run
    layers = analyze(base, run, steps=[20], modules=MODULE_RE, metrics=["spectrum", "amplification"])
    spectra = update_spectra(layers)
    from safetensors.torch import load_file

    w0s = load_file(str(base / "model.safetensors"))
    adapter = load_file(str(run / "checkpoint-20" / "adapter_model.safetensors"))
    scale = 8 / 4
    for row in layers.to_dict("records"):
        key = f"base_model.model.{row['module']}"
        a = adapter[f"{key}.lora_A.weight"].double().numpy()
        b = adapter[f"{key}.lora_B.weight"].double().numpy()
        w0 = w0s[f"{row['module']}.weight"].double().numpy()
        dw = scale * b @ a
        u, s, vt = np.linalg.svd(dw)
        s = s[: a.shape[0]]
        p = s / s.sum()
        proj = np.linalg.norm(u[:, :4].T @ w0 @ vt[:4].T)
        fro = np.sqrt((s**2).sum())
        expected = {
            "dw_fro": fro, "dw_rel": fro / np.linalg.norm(w0), "dw_stable_rank": (s**2).sum() / s[0] ** 2,
            "dw_effective_rank": np.exp(-(p * np.log(p)).sum()), "proj_norm": proj, "amplification": fro / proj,
        }  # fmt: skip
        for column, want in expected.items():
            assert abs(row[column] - want) <= 1e-6 * abs(want), (row["module"], column, row[column], want)
        assert row["amp_rank"] == 4
        assert row["dw_rank90"] == int(np.argmax(np.cumsum(s**2) / (s**2).sum() >= 0.9) + 1)
        sigma = spectra.loc[spectra["module"] == row["module"], "sigma"].to_numpy()
        assert len(sigma) == 4 and np.allclose(sigma, s, rtol=1e-6, atol=0), (row["module"], sigma, s)


def test_spectra_of_a_full_fine_tune_match_numpy_float64(lora_run: tuple[Path, Path, torch.nn.Module], tmp_path: Path) -> None:
    """The dense path: the top 64 singular values of dW = W_t - W0 of a full checkpoint (spectra.csv)."""
    from safetensors.torch import load_file, save_file

    base, _, _ = lora_run
    w0s = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(1)
    tuned = {k: (v + 0.01 * torch.randn(v.shape, generator=gen)).contiguous() for k, v in w0s.items()}
    save_file(tuned, tmp_path / "tuned.safetensors")
    spectra = update_spectra(analyze(base, tmp_path / "tuned.safetensors", modules=MODULE_RE, metrics=["spectrum"]))
    assert len(spectra)
    for module, part in spectra.groupby("module"):
        dw = tuned[f"{module}.weight"].double().numpy() - w0s[f"{module}.weight"].double().numpy()
        s = np.linalg.svd(dw, compute_uv=False)[:64]
        assert part["i"].tolist() == list(range(1, len(s) + 1))
        assert np.allclose(part["sigma"].to_numpy(), s, rtol=1e-6, atol=0), module


def test_base_decomposed_once_per_matrix_and_pairs_in_the_same_walk(
    lora_run: tuple[Path, Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, run, _ = lora_run
    calls: list[tuple[int, ...]] = []
    real = sp.decompose_base
    monkeypatch.setattr(sp, "decompose_base", lambda w: calls.append(tuple(w.shape)) or real(w))
    layers = analyze(base, run, modules=MODULE_RE, metrics=["md", "spectrum", "intruders"])
    n_matrices = layers["module"].nunique()
    assert len(layers) == 3 * n_matrices  # three checkpoints
    assert len(calls) == n_matrices  # once per base matrix, not per checkpoint
    pairs = subspace_pairs(layers)
    assert list(pairs.columns) == ["run_a", "step_a", "run_b", "step_b", "module", "i", "j", "phi"]
    # Three steps: three pairs per matrix, r x r = 16 entries each.
    assert len(pairs) == n_matrices * 3 * 16
    assert pairs["phi"].between(0, 1 + 1e-9).all()
    # phi against its definition for one pair, from the adapters' own factors.
    one = pairs[(pairs["step_a"] == 10) & (pairs["step_b"] == 30)]
    module = one["module"].iloc[0]
    from safetensors.torch import load_file

    def left(step: int) -> np.ndarray:
        f = load_file(str(run / f"checkpoint-{step}" / "adapter_model.safetensors"))
        key = f"base_model.model.{module}"
        dw = f[f"{key}.lora_B.weight"].double().numpy() @ f[f"{key}.lora_A.weight"].double().numpy()
        return np.linalg.svd(dw)[0][:, :4]

    ua, ub = left(10), left(30)
    got = one[one["module"] == module].set_index(["i", "j"])["phi"]
    for (i, j), value in got.items():
        assert value == pytest.approx(np.linalg.norm(ua[:, :i].T @ ub[:, :j]) ** 2 / min(i, j), abs=1e-9)


def test_second_run_with_the_cache_does_not_decompose_the_base_again(
    lora_run: tuple[Path, Path, torch.nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, run, _ = lora_run
    calls: list[tuple[int, ...]] = []
    real = sp.decompose_base
    monkeypatch.setattr(sp, "decompose_base", lambda w: calls.append(tuple(w.shape)) or real(w))
    metrics = ["md", "spectrum", "intruders"]  # spectrum compares versions: results are not cached
    cache = tmp_path / "out" / ".cache"
    first = analyze(base, run, modules=MODULE_RE, metrics=metrics, cache=cache)
    n_matrices = first["module"].nunique()
    assert len(calls) == n_matrices
    stored = sorted((cache / "base").glob("*.safetensors"))
    assert len(stored) == n_matrices  # one file per base matrix
    second = analyze(base, run, modules=MODULE_RE, metrics=metrics, cache=cache)
    assert len(calls) == n_matrices  # the second invocation decomposed nothing
    fresh = analyze(base, run, modules=MODULE_RE, metrics=metrics)  # no cache at all
    assert len(calls) == 2 * n_matrices
    # The stored factors give bit for bit the numbers a fresh SVD gives.
    pd.testing.assert_frame_equal(second, first, check_exact=True)
    pd.testing.assert_frame_equal(fresh, first, check_exact=True)
    pd.testing.assert_frame_equal(subspace_pairs(second), subspace_pairs(fresh), check_exact=True)
    # A damaged file is recomputed (and rewritten), never trusted.
    stored[0].write_bytes(b"not a safetensors file")
    analyze(base, run, modules=MODULE_RE, metrics=metrics, cache=cache)
    assert len(calls) == 2 * n_matrices + 1
    # A re-saved base is another base: every matrix again.
    weights = next(base.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    analyze(base, run, modules=MODULE_RE, metrics=metrics, cache=cache)
    assert len(calls) == 3 * n_matrices + 1


def test_md_numbers_do_not_change_with_spectral_metrics(lora_run: tuple[Path, Path, torch.nn.Module]) -> None:
    base, run, _ = lora_run
    alone = analyze(base, run, modules=MODULE_RE)
    together = analyze(base, run, modules=MODULE_RE, metrics=["md", "spectrum", "intruders", "amplification"])
    pd.testing.assert_frame_equal(alone, together[alone.columns])
    assert len(subspace_pairs(alone)) == 0


def test_cli_writes_columns_pairs_and_report(lora_run: tuple[Path, Path, torch.nn.Module], tmp_path: Path) -> None:
    from dora_analysis.cli.analyze import main

    base, run, _ = lora_run
    out = tmp_path / "out"
    argv = [str(base), str(run), "--modules", MODULE_RE, "--metrics", "md,spectrum,intruders,amplification"]
    status = main([*argv, "--out", str(out), "--quiet", "--intruder-k", "5", "--no-cache"])
    assert status == 0
    layers = pd.read_csv(out / "layers.csv")
    assert {"dw_stable_rank", "dw_effective_rank", "dw_rank90", "intruders", "intruder_min_sim", "amplification"} <= set(layers.columns)
    assert (layers["intruder_k"] == 5).all()
    pairs = pd.read_csv(out / "pairs.csv")
    assert len(pairs) and pairs["phi"].between(0, 1 + 1e-9).all()
    report = (out / "report.md").read_text()
    for title in ("Spectrum of the update", "Intruder dimensions", "Amplification"):
        assert title in report
    assert (out / "figures").is_dir()
    spectra = pd.read_csv(out / "spectra.csv")
    assert list(spectra.columns) == ["run", "method", "step", "module", "i", "sigma"]
    assert len(spectra) == 4 * len(layers)  # r = 4 values per matrix and checkpoint
    assert (out / "figures" / "update_spectra.png").is_file() and "Singular values of the update" in report
