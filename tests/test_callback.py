"""DecompositionCallback on a real transformers.Trainer: its rows equal dora-analyze on the saved
checkpoints, its scalars reach the log history, and the model trains exactly as without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import dora_analysis as da
from dora_analysis.metrics.base import ID_COLUMNS

transformers = pytest.importorskip("transformers")
from dora_analysis.integrations.hf import DecompositionCallback  # noqa: E402

STEPS, SAVE_EVERY = 4, 2


class _Data(torch.utils.data.Dataset):
    """16 random sequences of 8 tokens with binary labels, fixed by the seed."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 64, (16, 8), generator=g)
        self.labels = torch.randint(0, 2, (16,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def _model(method: str, base: Path | None) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=16, num_labels=2,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config)
    if base is not None:
        model.save_pretrained(base)
    if method == "dora":
        peft = pytest.importorskip("peft")
        config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["query", "value"], task_type="SEQ_CLS")
        model = peft.get_peft_model(model, config)
    return model


def _train(out: Path, method: str, callback: DecompositionCallback | None, base: Path | None = None) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, save_steps=SAVE_EVERY, save_only_model=True, per_device_train_batch_size=4,
        learning_rate=5e-3, logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=_model(method, base), args=args, train_dataset=_Data(), callbacks=[callback] if callback else [])
    trainer.train()
    return trainer


class _Guarded(DecompositionCallback):
    """The callback, checking around each of its events that the model's tensors and torch's RNG are untouched."""

    events: list[str]

    def _guard(self, event: str, args: object, state: object, control: object, **kwargs: object) -> None:
        model = kwargs["model"]
        assert isinstance(model, torch.nn.Module)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        rng = torch.get_rng_state()
        getattr(DecompositionCallback, event)(self, args, state, control, **kwargs)
        assert torch.equal(torch.get_rng_state(), rng), event
        after = model.state_dict()
        assert after.keys() == before.keys(), event
        for k, v in before.items():
            assert torch.equal(after[k], v), (event, k)
        self.events = [*getattr(self, "events", []), event]

    def on_train_begin(self, *args: object, **kwargs: object) -> None:
        self._guard("on_train_begin", *args, **kwargs)

    def on_step_end(self, *args: object, **kwargs: object) -> None:
        self._guard("on_step_end", *args, **kwargs)

    def on_save(self, *args: object, **kwargs: object) -> None:
        self._guard("on_save", *args, **kwargs)

    def on_train_end(self, *args: object, **kwargs: object) -> None:
        self._guard("on_train_end", *args, **kwargs)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        data = _Data()
        return model(input_ids=data.ids, attention_mask=torch.ones_like(data.ids)).logits


@pytest.mark.parametrize("method", ["ft", "dora"])
def test_callback_equals_dora_analyze_and_leaves_training_unchanged(tmp_path: Path, method: str) -> None:
    base, run = tmp_path / "base", tmp_path / "run"
    # The figure is the same code for every method and costs most of a run: drawn for one.
    # ft measures from on_step_end (every_n_steps, at the save steps), dora from on_save.
    callback = _Guarded(figures=method == "dora", every_n_steps=SAVE_EVERY if method == "ft" else None)
    trainer = _train(run, method, callback, base=base)

    # 1. decomposition.csv equals dora-analyze on the checkpoints the Trainer saved.
    # Rows are compared by (step, module): the order of matrices follows each side's file order.
    key = ["step", "module"]
    got = pd.read_csv(run / "decomposition.csv").sort_values(key, kind="stable").reset_index(drop=True)
    expected = da.analyze(base, run).sort_values(key, kind="stable").reset_index(drop=True)
    assert sorted(expected["step"].unique()) == [2, 4]
    assert list(got.columns) == list(expected.columns)
    assert len(got) == len(expected) == (2 * 2 * 6 if method == "ft" else 2 * 2 * 2)  # steps x layers x kinds
    for column in expected.columns:
        if column in {c.name for c in ID_COLUMNS} or not pd.api.types.is_numeric_dtype(expected[column]):
            assert got[column].astype(str).tolist() == expected[column].astype(str).tolist(), column
        else:
            np.testing.assert_allclose(got[column].to_numpy(float), expected[column].to_numpy(float), rtol=1e-9, atol=0)
    assert set(got["method"]) == {method}
    assert (got["delta_d"] > 0).all()

    # 2. The scalars went through Trainer.log: in the log history, at each save.
    logged = [h for h in trainer.state.log_history if "decomposition/all/mean_delta_m" in h]
    assert [h["step"] for h in logged] == [2, 4]
    assert logged[-1]["decomposition/all/mean_delta_m"] == pytest.approx(expected[expected["step"] == 4]["delta_m"].mean(), rel=1e-12)
    assert "decomposition/query/mean_delta_d" in logged[-1] and "decomposition/all/pearson_r" in logged[-1]
    # ... beside the Trainer's own logs, none of which they displaced (logging_steps=1).
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == list(range(1, STEPS + 1))
    assert (run / "decomposition.png").stat().st_size > 0 if method == "dora" else not (run / "decomposition.png").exists()

    # 3. Nothing of the model changed. Every event of the callback left the model's tensors and
    # torch's RNG as it found them (checked by _Guarded, both methods) ...
    assert callback.events.count("on_save") == 2 and callback.events[0] == "on_train_begin" and callback.events[-1] == "on_train_end"
    if method == "ft":
        return
    # ... and, once (the PEFT path, the one that reads the adapter's state dict): trained
    # without the callback, it is the same model.
    plain = _train(tmp_path / "plain", method, None)
    assert torch.equal(_logits(trainer.model), _logits(plain.model))
    for (name, a), (_, b) in zip(trainer.model.state_dict().items(), plain.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


# --- the built-in trainer: the same code path ------------------------------------------------------

from .test_train_run import _config, tiny_base  # noqa: E402, F401  (a module fixture, reused)


@pytest.mark.parametrize("method", ["ft", "dora"])
def test_dora_train_writes_the_decomposition_dora_analyze_computes(
    tiny_base: Path,  # noqa: F811
    tmp_path: Path,
    method: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from safetensors.torch import load_file

    from dora_analysis.integrations.live import LiveDecomposition
    from dora_analysis.train import train

    run = tmp_path / "run"
    train(_config(tiny_base, run, method))
    key = ["step", "module"]
    got = pd.read_csv(run / "decomposition.csv").sort_values(key, kind="stable").reset_index(drop=True)
    expected = da.analyze(tiny_base, run).sort_values(key, kind="stable").reset_index(drop=True)
    assert sorted(got["step"].unique()) == [2, 4] and list(got.columns) == list(expected.columns)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, check_exact=False, rtol=1e-9, atol=0)

    if method == "dora":  # the trained weights are those of a run that measures nothing
        monkeypatch.setattr(LiveDecomposition, "measure", lambda self, step, snapshot: None)
        train(_config(tiny_base, tmp_path / "plain", method))
        for name in ("checkpoint-2", "checkpoint-4"):
            a = load_file(run / name / "adapter_model.safetensors")
            b = load_file(tmp_path / "plain" / name / "adapter_model.safetensors")
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
