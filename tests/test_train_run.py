"""End-to-end trainer runs on a tiny random BERT: checkpoints, PEFT round trip, resume, errors."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dora_analysis.cli.train import build_parser, config_from_args, main
from dora_analysis.train import EncoderClassifier, TrainConfig, TrainResult, merged_state_dict, train
from dora_analysis.train.checkpoint import MetricsLog
from dora_analysis.train.data import ADJECTIVES, NOUNS

METHODS = ("ft", "lora", "dora")
TARGETS = ("query", "value")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init 2-layer BERT with a tokenizer that knows the synthetic task's words."""
    from transformers import BertConfig, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("tiny")
    adjectives = [w for pos, neg in ADJECTIVES.values() for w in (*pos, *neg)]
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "was", "not", *NOUNS, *adjectives, "fine", "film"]
    (root / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=32,
    )  # fmt: skip
    base = root / "base"
    BertModel(config).save_pretrained(base)
    BertTokenizer(str(root / "vocab.txt")).save_pretrained(base)
    return base


def _config(base: Path, out: Path, method: str, **kwargs: object) -> TrainConfig:
    """A run of a few steps that saves every 2: seconds on a CPU."""
    settings: dict[str, object] = {
        "model": base, "steps": 4, "batch_size": 8, "synthetic_size": 64, "save_every": 2,
        "progress": False, "device": "cpu", **kwargs,
    }  # fmt: skip
    return TrainConfig(method=method, out=out, **settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def runs(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrainResult]:
    """One 4-step run per method, shared by the read-only checks below."""
    root = tmp_path_factory.mktemp("runs")
    return {m: train(_config(tiny_base, root / m, m)) for m in METHODS}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# --- what a run writes ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_run_writes_complete_checkpoints(runs: dict[str, TrainResult], tiny_base: Path, method: str) -> None:
    result = runs[method]
    run = result.run_dir
    assert [p.name for p in result.checkpoints] == ["checkpoint-2", "checkpoint-4"]
    assert not list(run.glob(".*tmp"))
    for step, ckpt in ((2, run / "checkpoint-2"), (4, run / "checkpoint-4")):
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["global_step"] == step
        assert [h["step"] for h in state["log_history"]] == list(range(1, step + 1))
    # Resume state (optimizer, schedule, RNG) lives in the newest checkpoint only.
    assert (run / "checkpoint-4" / "optimizer.pt").is_file()
    assert not (run / "checkpoint-2" / "optimizer.pt").exists()
    with (run / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["loss"]) > 0 for r in rows)


def test_ft_checkpoint_uses_the_base_names(runs: dict[str, TrainResult], tiny_base: Path) -> None:
    ckpt = runs["ft"].run_dir / "checkpoint-4"
    base = _tensors(tiny_base / "model.safetensors")
    tuned = _tensors(ckpt / "model.safetensors")
    assert set(base) <= set(tuned)
    assert set(tuned) - set(base) == {"head.weight", "head.bias"}
    name = "encoder.layer.0.attention.self.query.weight"
    assert tuned[name].shape == base[name].shape and not torch.equal(tuned[name], base[name])
    assert json.loads((ckpt / "config.json").read_text()) == json.loads((tiny_base / "config.json").read_text())


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_checkpoint_has_peft_names(runs: dict[str, TrainResult], tiny_base: Path, method: str) -> None:
    ckpt = runs[method].run_dir / "checkpoint-4"
    config = json.loads((ckpt / "adapter_config.json").read_text())
    modules = [f"encoder.layer.{i}.attention.self.{k}" for i in range(2) for k in TARGETS]
    assert config["peft_type"] == "LORA" and config["use_dora"] == (method == "dora")
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (8, 16, False)
    assert sorted(config["target_modules"]) == sorted(modules)
    assert config["modules_to_save"] == ["head"]
    assert config["base_model_name_or_path"] == str(tiny_base.resolve())
    suffixes = ["lora_A.weight", "lora_B.weight"] + (["lora_magnitude_vector"] if method == "dora" else [])
    expected = {f"base_model.model.{m}.{s}" for m in modules for s in suffixes}
    expected |= {"base_model.model.head.weight", "base_model.model.head.bias"}
    assert set(_tensors(ckpt / "adapter_model.safetensors")) == expected


@pytest.mark.parametrize("method", METHODS)
def test_analyzer_reads_the_run(runs: dict[str, TrainResult], tiny_base: Path, method: str) -> None:
    import dora_analysis as da

    df = da.analyze(tiny_base, [runs[method].run_dir])
    assert set(df["method"]) == {method}
    assert sorted(df["step"].unique()) == [2, 4]
    query = df[df["module"] == "encoder.layer.0.attention.self.query"]
    assert len(query) == 2 and (query["delta_d"] > 0).all() and (query["delta_m"] > 0).all()
    if method != "ft":  # adapters change only their targets
        assert set(df["module"].str.rsplit(".", n=1).str[-1]) == set(TARGETS)


@pytest.mark.parametrize("method", METHODS)
def test_dora_analyze_cli_reads_the_run(
    runs: dict[str, TrainResult], tiny_base: Path, method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from dora_analysis.cli.analyze import main as analyze_main

    run = runs[method].run_dir
    assert analyze_main([str(tiny_base), str(run), "--quiet"]) == 0
    if method != "ft":  # an adapter names its local base: no BASE argument needed
        assert analyze_main([str(run / "checkpoint-4"), "--quiet"]) == 0
    assert "error" not in capsys.readouterr().err


# --- PEFT as the oracle for adapter files --------------------------------------------------------


def _peft_merged(base: Path, ckpt: Path) -> tuple[EncoderClassifier, dict[str, torch.Tensor]]:
    peft = pytest.importorskip("peft", reason="peft is the oracle for saved adapters; install the dev extras")
    model = peft.PeftModel.from_pretrained(EncoderClassifier.from_pretrained(base, num_labels=2), str(ckpt))
    merged = model.merge_and_unload()
    return merged, merged.state_dict()


@pytest.mark.parametrize(
    "method, extra",
    [
        ("lora", {}),
        ("dora", {}),
        ("dora", {"rslora": True, "magnitude_only": r"attention\.output\.dense"}),  # paper table 6
    ],
    ids=["lora", "dora", "dora-rslora-magnitude-only"],
)
def test_peft_loads_the_adapter_and_merges_like_the_trainer(tiny_base: Path, tmp_path: Path, method: str, extra: dict) -> None:
    result = train(_config(tiny_base, tmp_path / "run", method, steps=3, **extra))
    ckpt = result.checkpoints[-1]
    merged_model, peft_state = _peft_merged(tiny_base, ckpt)
    ours = merged_state_dict(result.model)
    assert set(peft_state) == set(ours)
    for name, tensor in ours.items():
        torch.testing.assert_close(peft_state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)

    batch = {"input_ids": torch.tensor([[2, 5, 9, 6, 7, 30, 3]]), "attention_mask": torch.ones(1, 7, dtype=torch.long)}
    result.model.eval(), merged_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged_model(**batch), result.model(**batch), rtol=1e-5, atol=1e-5)

    if "magnitude_only" in extra:
        saved = _tensors(ckpt / "adapter_model.safetensors")
        dense = [k for k in saved if "attention.output.dense.lora_B" in k]
        assert dense and all(torch.count_nonzero(saved[k]) == 0 for k in dense)  # direction frozen
        magnitudes = [k for k in saved if "attention.output.dense.lora_magnitude_vector" in k]
        base = _tensors(tiny_base / "model.safetensors")
        for key in magnitudes:
            w0 = base[key.removeprefix("base_model.model.").replace("lora_magnitude_vector", "weight")]
            assert not torch.allclose(saved[key], torch.linalg.norm(w0, dim=1))  # but m trained
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["magnitude_only_modules"] == [f"encoder.layer.{i}.attention.output.dense" for i in range(2)]


# --- determinism and resume ----------------------------------------------------------------------


def _same_checkpoint(a: Path, b: Path) -> None:
    """Bit-for-bit equal weights and identical loss history."""
    weights = "model.safetensors" if (a / "model.safetensors").is_file() else "adapter_model.safetensors"
    ta, tb = _tensors(a / weights), _tensors(b / weights)
    assert set(ta) == set(tb)
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    history = [json.loads((p / "trainer_state.json").read_text())["log_history"] for p in (a, b)]
    assert history[0] == history[1]


def test_interrupted_ft_run_resumes_bit_for_bit(
    runs: dict[str, TrainResult], tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(tiny_base, tmp_path / "ft", "ft")
    real_append = MetricsLog.append

    def interrupt_at_step_3(self: MetricsLog, record: dict) -> None:
        real_append(self, record)
        if record["step"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(MetricsLog, "append", interrupt_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    assert (cfg.out / "checkpoint-2").is_dir() and not (cfg.out / "checkpoint-4").exists()

    resumed = train(_config(tiny_base, cfg.out, "ft", resume=True))
    assert resumed.resumed_from == 2
    _same_checkpoint(cfg.out / "checkpoint-4", runs["ft"].run_dir / "checkpoint-4")
    # Step 3 of the interrupted attempt was logged twice on disk; the resume rewrote the file.
    assert (cfg.out / "metrics.csv").read_text() == (runs["ft"].run_dir / "metrics.csv").read_text()


_KILL_SCRIPT = """
import os, signal, sys
from dora_analysis.train import checkpoint
from dora_analysis.cli.train import main

real = checkpoint.CheckpointWriter._save_weights

def die_while_saving(self, folder, model):
    real(self, folder, model)
    if folder.name == ".checkpoint-4.tmp":
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs: a real kill mid-save

checkpoint.CheckpointWriter._save_weights = die_while_saving
sys.exit(main(sys.argv[1:]))
"""


def test_killed_dora_run_resumes_bit_for_bit(tiny_base: Path, tmp_path: Path) -> None:
    argv = [
        "--method", "dora", "--out", str(tmp_path / "killed"), "--model", str(tiny_base), "--steps", "6",
        "--batch-size", "8", "--synthetic-size", "64", "--save-every", "2", "--device", "cpu", "--quiet",
    ]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    killed = tmp_path / "killed"
    assert (killed / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert not (killed / "checkpoint-4").exists() and (killed / ".checkpoint-4.tmp").is_dir()

    assert main([*argv, "--resume"]) == 0
    assert not (killed / ".checkpoint-4.tmp").exists()
    uninterrupted = train(_config(tiny_base, tmp_path / "straight", "dora", steps=6))
    for step in (4, 6):
        _same_checkpoint(killed / f"checkpoint-{step}", uninterrupted.run_dir / f"checkpoint-{step}")
    assert (killed / "metrics.csv").read_text() == (uninterrupted.run_dir / "metrics.csv").read_text()


def test_seed_changes_the_run(runs: dict[str, TrainResult], tiny_base: Path, tmp_path: Path) -> None:
    other = train(_config(tiny_base, tmp_path / "seed1", "lora", seed=1, steps=2))
    a = _tensors(runs["lora"].run_dir / "checkpoint-2" / "adapter_model.safetensors")
    b = _tensors(other.run_dir / "checkpoint-2" / "adapter_model.safetensors")
    assert not torch.equal(a["base_model.model.head.weight"], b["base_model.model.head.weight"])


# --- the command line ----------------------------------------------------------------------------


def test_cli_trains_on_a_data_file(tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"the film was {w}", "label": i % 3}) + "\n" for i, w in enumerate(NOUNS)))
    out = tmp_path / "run"
    argv = ["--method", "lora", "--out", str(out), "--model", str(tiny_base), "--data", str(data),
            "--steps", "3", "--batch-size", "4", "--save-steps", "2", "--target-regex", r"attention\.self\.key",
            "--schedule", "cosine", "--warmup-steps", "1", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "checkpoint-2" in printed.out and "checkpoint-3" in printed.out
    assert "lora" in printed.err and "loss=" in printed.err  # the progress bar, on stderr
    saved = _tensors(out / "checkpoint-3" / "adapter_model.safetensors")
    assert saved["base_model.model.head.weight"].shape[0] == 3  # labels 0..2
    assert all(".attention.self.key." in k for k in saved if "lora_" in k)
    assert main([*argv, "--resume"]) == 0 and "already complete" in capsys.readouterr().out


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI expecting a bad-input exit; return its one-line message."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dora-train: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_cli_errors_are_one_line(runs: dict[str, TrainResult], tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def argv(out: Path, *extra: str, model: Path = tiny_base) -> list[str]:
        return ["--method", "dora", "--out", str(out), "--model", str(model), "--steps", "4", "--batch-size", "8",
                "--synthetic-size", "64", "--save-every", "2", "--device", "cpu", "--quiet", *extra]  # fmt: skip

    empty = tmp_path / "not_a_model"
    empty.mkdir()
    assert "not a transformers model folder" in _error(argv(tmp_path / "a", model=empty), capsys)
    assert "model folder not found" in _error(argv(tmp_path / "a", model=tmp_path / "missing"), capsys)
    assert "target 'nope' matches no linear module" in _error(argv(tmp_path / "a", "--targets", "query,nope"), capsys)
    assert "matches only LayerNorm modules" in _error(argv(tmp_path / "a", "--target-regex", "LayerNorm$"), capsys)
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nthe film was fine,1\nthe film was dull,maybe\n")
    message = _error(argv(tmp_path / "a", "--data", str(bad)), capsys)
    assert "line 3: label must be a non-negative integer" in message and str(bad) in message
    assert not (tmp_path / "a").exists()  # nothing was claimed by the failed attempts

    # The `runs` fixture's dora run was made with this argv's settings.
    existing = runs["dora"].run_dir
    assert "already holds this run" in _error(argv(existing), capsys)
    assert "holds a different run (differs in: " in _error(argv(existing, "--lr", "0.01"), capsys)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    assert "not empty and holds no dora-train run" in _error(argv(junk), capsys)
    if not torch.cuda.is_available():
        assert "no CUDA device" in _error(argv(tmp_path / "a", "--device", "cuda"), capsys)


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "--save-steps" in capsys.readouterr().out


def test_cli_options_are_the_config_fields(tmp_path: Path) -> None:
    """Generated from TrainConfig: the defaults are the dataclass's, and every flag sets its field."""
    parser = build_parser()
    assert config_from_args(parser.parse_args(["--method", "dora", "--out", str(tmp_path)])) == TrainConfig(method="dora", out=tmp_path)
    argv = ["--method", "lora", "--out", str(tmp_path), "--negation-p", "0.4", "--flip-p", "0.1", "--noise", "sentence",
            "--words", "common", "-r", "4", "--rslora", "--targets", "query, key", "--save-steps", "20,10", "--quiet"]  # fmt: skip
    cfg = config_from_args(parser.parse_args(argv))
    assert (cfg.synthetic_negation_p, cfg.synthetic_flip_p, cfg.synthetic_noise, cfg.synthetic_words) == (0.4, 0.1, "sentence", "common")
    assert (cfg.rank, cfg.rslora, cfg.targets, cfg.save_steps, cfg.progress) == (4, True, ("query", "key"), (10, 20), False)
    text = " ".join(parser.format_help().split())  # unwrapped
    assert "(default 4000)" in text and "(default query,value)" in text and "{example,sentence}" in text


def test_cli_help_does_not_import_torch() -> None:
    code = "import sys, dora_analysis.cli.train as c; c.build_parser(); print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr
