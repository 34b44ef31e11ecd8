"""Shared fixtures: a fixed seed for every test, and tiny checkpoints built from configs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state, so failures reproduce."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def write_trainer_state(folder: Path, step: int) -> None:
    """The part of a Hugging Face Trainer snapshot the analyzer reads."""
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


@pytest.fixture
def tiny_bert(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random-init 3-layer BERT saved (sharded safetensors) to ``tmp_path/base``."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=16,
    )  # fmt: skip
    model = BertModel(cfg)
    base = tmp_path / "base"
    model.save_pretrained(base, max_shard_size="40KB")
    assert (base / "model.safetensors.index.json").is_file(), "expected a sharded save"
    return base, {k: v.detach().clone() for k, v in model.state_dict().items()}
