"""Full-checkpoint readers: every format, folder detection, and bad files."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dora_analysis.containers import open_checkpoint
from dora_analysis.errors import InputError
from dora_analysis.names import kind_order, kinds, layer_index, match_names, module_name, select, strip_wrappers

STATE = {
    "layers.0.attn.q.weight": torch.randn(4, 3),
    "layers.1.attn.q.weight": torch.randn(4, 3),
    "norm.weight": torch.randn(3),
}


def _save_sharded_safetensors(folder: Path) -> None:
    folder.mkdir()
    save_file({"layers.0.attn.q.weight": STATE["layers.0.attn.q.weight"]}, folder / "a.safetensors")
    save_file({k: v for k, v in STATE.items() if not k.startswith("layers.0")}, folder / "b.safetensors")
    wm = {k: ("a.safetensors" if k.startswith("layers.0") else "b.safetensors") for k in STATE}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))


def _save_sharded_bin(folder: Path) -> None:
    folder.mkdir()
    torch.save({"layers.0.attn.q.weight": STATE["layers.0.attn.q.weight"]}, folder / "pytorch_model-1.bin")
    torch.save({k: v for k, v in STATE.items() if not k.startswith("layers.0")}, folder / "pytorch_model-2.bin")
    wm = {k: ("pytorch_model-1.bin" if k.startswith("layers.0") else "pytorch_model-2.bin") for k in STATE}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))


WRITERS = {
    "safetensors file": lambda d: save_file(STATE, d / "w.safetensors") or d / "w.safetensors",
    "safetensors folder": lambda d: (d / "m").mkdir() or save_file(STATE, d / "m" / "model.safetensors") or d / "m",
    "sharded safetensors": lambda d: _save_sharded_safetensors(d / "m") or d / "m",
    "bin file": lambda d: torch.save(STATE, d / "pytorch_model.bin") or d / "pytorch_model.bin",
    "pt file": lambda d: torch.save(STATE, d / "w.pt") or d / "w.pt",
    "legacy (non-zip) pickle": lambda d: torch.save(STATE, d / "old.bin", _use_new_zipfile_serialization=False) or d / "old.bin",
    "bin folder": lambda d: (d / "m").mkdir() or torch.save(STATE, d / "m" / "pytorch_model.bin") or d / "m",
    "sharded bin": lambda d: _save_sharded_bin(d / "m") or d / "m",
    "lightning-style state_dict wrapper": lambda d: torch.save({"state_dict": STATE, "epoch": 3}, d / "x.ckpt") or d / "x.ckpt",
}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_every_format_reads_the_same_tensors(tmp_path: Path, fmt: str) -> None:
    store = open_checkpoint(WRITERS[fmt](tmp_path))
    assert sorted(store.keys()) == sorted(STATE)
    for k, v in STATE.items():
        assert store.shape(k) == tuple(v.shape)
        assert torch.equal(store.get(k), v)


def test_bin_is_memory_mapped_not_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    real = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    open_checkpoint(WRITERS["bin file"](tmp_path))
    assert seen["weights_only"] is True and seen["mmap"] is True


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(2, 2), "x": _Evil()}, path)
    with pytest.raises(InputError, match=r"evil\.bin: refusing to load"):
        open_checkpoint(path)


def test_truncated_safetensors_names_the_file(tmp_path: Path) -> None:
    path = WRITERS["safetensors file"](tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    with pytest.raises(
        InputError, match=r"w\.safetensors \[layers\.1\.attn\.q\.weight\]: not a readable safetensors file: tensor data runs past the end"
    ):
        open_checkpoint(path)
    path.write_bytes(data[:5])
    with pytest.raises(InputError, match=r"w\.safetensors: not a readable safetensors file: file is shorter"):
        open_checkpoint(path)


@pytest.mark.parametrize(
    "content, name, message",
    [
        (b"\x00\x01garbage", "w.safetensors", "not a readable safetensors file"),
        (b"not a pickle at all", "w.bin", "not a readable PyTorch checkpoint"),
        (pickle.dumps({"a": 1}, protocol=2), "w.pt", "not a readable PyTorch checkpoint"),
        (_torch_bytes({"epoch": 3, "note": "no tensors"}), "w.pth", "file holds no state dict of tensors"),
        (b"hello", "notes.txt", "unknown checkpoint format"),
        (b"{bad json", "model.safetensors.index.json", "not a valid checkpoint index"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path: Path, content: bytes, name: str, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=message) as info:
        open_checkpoint(tmp_path / name)
    assert "\n" not in str(info.value) and name in str(info.value)


def test_missing_path_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or folder"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no checkpoint in folder"):
        open_checkpoint(tmp_path / "empty")


def test_missing_shard_is_named(tmp_path: Path) -> None:
    folder = WRITERS["sharded safetensors"](tmp_path)
    (folder / "b.safetensors").unlink()
    with pytest.raises(InputError, match=r"b\.safetensors: shard listed in the index is missing"):
        open_checkpoint(folder)


@pytest.mark.parametrize(
    "tuned_prefix",
    ["", "module.", "_orig_mod.", "module._orig_mod.", "base_model.model."],
)
def test_wrapper_prefixes_are_matched(tuned_prefix: str) -> None:
    base = ["model.layers.0.q.weight", "model.layers.1.q.weight"]
    tuned = [tuned_prefix + b for b in base]
    assert match_names(base, tuned) == dict(zip(base, tuned))


def test_head_prefix_is_found_from_the_names() -> None:
    base = ["encoder.layer.0.q.weight", "encoder.layer.1.q.weight", "pooler.dense.weight"]
    tuned = ["bert." + b for b in base] + ["classifier.weight"]
    assert match_names(base, tuned) == {b: "bert." + b for b in base}
    # ... and the other way round.
    assert match_names(tuned[:3], base) == dict(zip(tuned[:3], base))


@pytest.mark.parametrize(
    "family, expected",
    [
        ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        ("bert", ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]),
        ("gpt2", ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]),
    ],
)
def test_kinds_of_real_models_are_listed_in_the_order_a_block_applies_them(family: str, expected: list[str]) -> None:
    """The names come from transformers' own models, listed as checkpoints list them (alphabetically)."""
    import transformers as tf

    model = {
        "llama": lambda: tf.LlamaModel(
            tf.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
        ),
        "bert": lambda: tf.BertModel(
            tf.BertConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
        ),
        "gpt2": lambda: tf.GPT2Model(tf.GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2)),
    }[family]()
    modules = sorted(module_name(k) for k, v in model.state_dict().items() if v.ndim == 2 and layer_index(k) is not None)
    assert kind_order(kinds(modules).values()) == expected


def test_names_layers_kinds_and_default_selection() -> None:
    assert strip_wrappers("module._orig_mod.x") == "x"
    assert layer_index("model.layers.12.self_attn.q_proj.weight") == 12
    assert layer_index("lm_head.weight") is None
    k = kinds(
        ["e.layer.0.attention.output.dense", "e.layer.0.output.dense", "e.layer.0.attention.self.query", "model.layers.3.self_attn.q_proj"]
    )
    assert k == {
        "e.layer.0.attention.output.dense": "attention.output.dense",
        "e.layer.0.output.dense": "output.dense",
        "e.layer.0.attention.self.query": "query",
        "model.layers.3.self_attn.q_proj": "q_proj",
    }
    shapes = {
        "model.embed_tokens.weight": (10, 4),
        "model.layers.0.self_attn.q_proj.weight": (4, 4),
        "model.layers.0.input_layernorm.weight": (4,),
        "lm_head.weight": (10, 4),
        "model.layers.0.conv.weight": (4, 4, 3, 3),
    }
    assert select(shapes) == ["model.layers.0.self_attn.q_proj.weight"]
    assert select(shapes, r"q_proj|lm_head") == ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
    assert len(select(shapes, include_all=True)) == 4
