"""Trainer inputs: the synthetic task, data files, batch order, schedules, the config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dora_analysis.errors import InputError
from dora_analysis.train.config import TrainConfig
from dora_analysis.train.data import ADJECTIVES, BatchOrder, num_labels, read_examples, synthetic_task
from dora_analysis.train.loop import lr_factor


def _rule(text: str) -> int:
    """Polarity XOR negation, read back from the sentence."""
    words = text.split()
    positive = any(words[-1] in pos for pos, _ in ADJECTIVES.values())
    assert positive or any(words[-1] in neg for _, neg in ADJECTIVES.values())
    return int(positive != ("not" in words))


def test_synthetic_task_is_seeded() -> None:
    assert synthetic_task(50, seed=3) == synthetic_task(50, seed=3)
    assert synthetic_task(50, seed=3) != synthetic_task(50, seed=4)


@pytest.mark.parametrize("words", sorted(ADJECTIVES))
def test_word_sets(words: str) -> None:
    positives, negatives = ADJECTIVES[words]
    assert len(positives) == len(negatives) == 10 and not set(positives) & set(negatives)
    used = {e.text.split()[-1] for e in synthetic_task(2000, seed=0, words=words)}  # type: ignore[arg-type]
    assert used == set(positives) | set(negatives)


def test_synthetic_labels_follow_the_rule_then_the_noise() -> None:
    clean = synthetic_task(500, seed=0, flip_p=0.0)
    assert all(e.label == _rule(e.text) for e in clean)
    assert all(e.text.startswith("the ") and " was " in e.text for e in clean)
    noisy = synthetic_task(4000, seed=0, noise="example")
    flipped = sum(e.label != _rule(e.text) for e in noisy) / len(noisy)
    negated = sum(" not " in e.text for e in noisy) / len(noisy)
    assert abs(flipped - 0.2) < 0.03 and abs(negated - 0.3) < 0.03
    assert len({e.text for e in noisy if e.label != _rule(e.text)}) > 200  # any sentence can flip


def test_sentence_noise_flips_each_sentence_consistently() -> None:
    labels: dict[str, set[int]] = {}
    for e in synthetic_task(4000, seed=0, noise="sentence"):
        labels.setdefault(e.text, set()).add(e.label)
    assert all(len(v) == 1 for v in labels.values())  # learnable exceptions, not coin flips
    flipped = sum(v != {_rule(t)} for t, v in labels.items()) / len(labels)
    assert len(labels) > 0.95 * 12 * 20 * 2 and abs(flipped - 0.2) < 0.06  # ~all 480 sentences occur
    other = {e.text: e.label for e in synthetic_task(4000, seed=1, noise="sentence")}
    assert any(other[t] not in v for t, v in labels.items() if t in other)  # the seed picks them


def test_read_jsonl_and_csv(tmp_path: Path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a fine film", "label": 1}\n\n{"text": "dull", "label": 0, "extra": 5}\n')
    csv = tmp_path / "d.csv"
    csv.write_text('text,label\n"a fine, long film",2\ndull,0\n')
    assert [(e.text, e.label) for e in read_examples(jsonl)] == [("a fine film", 1), ("dull", 0)]
    examples = read_examples(csv)
    assert [(e.text, e.label) for e in examples] == [("a fine, long film", 2), ("dull", 0)]
    assert num_labels(examples) == 3


BAD_FILES = [
    ("d.jsonl", '{"text": "ok", "label": 1}\n{"text": "no label"}\n', "line 2: missing label"),
    ("d.jsonl", '{"text": "ok", "label": 1}\n\n{"text": "x", "label": -1}\n', "line 3: label must be a non-negative integer"),
    ("d.jsonl", '{"text": "ok", "label": 1}\nnot json\n', "line 2: not valid JSON"),
    ("d.jsonl", '["text", 1]\n', "line 1: expected a JSON object"),
    ("d.jsonl", '{"text": "", "label": 1}\n', "line 1: text must be a non-empty string"),
    ("d.csv", "sentence,label\nok,1\n", "line 1: missing column(s) text"),
    ("d.csv", "text,label\nok,1\nbad,positive\n", "line 3: label must be a non-negative integer"),
    ("d.csv", "text,label\nok,1,surplus\n", "line 2: more fields than the header"),
    ("d.csv", "text,label\n", "no examples"),
    ("d.txt", "ok\t1\n", "unknown data format"),
]


@pytest.mark.parametrize("filename, content, message", BAD_FILES)
def test_bad_data_files_say_where(tmp_path: Path, filename: str, content: str, message: str) -> None:
    path = tmp_path / filename
    path.write_text(content)
    with pytest.raises(InputError) as err:
        read_examples(path)
    assert message in str(err.value)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_batch_order_is_a_function_of_the_step() -> None:
    order = BatchOrder(10, 3, seed=1)
    assert order.per_epoch == 3  # the remainder of an epoch is dropped: every batch is full
    first = [order.indices(s).tolist() for s in range(6)]
    fresh = BatchOrder(10, 3, seed=1)
    assert [fresh.indices(s).tolist() for s in (5, 0, 4, 1, 3, 2)] == [first[s] for s in (5, 0, 4, 1, 3, 2)]
    epoch0 = sum(first[:3], [])
    assert len(set(epoch0)) == 9  # no repeats within an epoch
    assert first[:3] != first[3:]  # reshuffled each epoch
    assert BatchOrder(10, 3, seed=2).indices(0).tolist() != first[0]
    with pytest.raises(InputError, match="fewer than the batch size"):
        BatchOrder(2, 3, seed=0)


@pytest.mark.parametrize(
    "schedule, warmup, expected",
    [
        ("constant", 0, [1.0, 1.0, 1.0, 1.0]),
        ("linear", 0, [1.0, 0.75, 0.5, 0.25]),  # reaches 0 after the last update
        ("linear", 2, [0.0, 0.5, 1.0, 0.5]),
        ("cosine", 0, [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
    ],
)
def test_lr_schedules(tmp_path: Path, schedule: str, warmup: int, expected: list[float]) -> None:
    cfg = TrainConfig(method="lora", out=tmp_path, steps=4, schedule=schedule, warmup_steps=warmup)  # type: ignore[arg-type]
    factor = lr_factor(cfg)
    assert [factor(s) for s in range(4)] == pytest.approx(expected)


def test_checkpoint_steps(tmp_path: Path) -> None:
    assert TrainConfig(method="ft", out=tmp_path).checkpoint_steps() == list(range(15, 241, 15))
    cfg = TrainConfig(method="ft", out=tmp_path, save_steps=(225, 195, 210, 240))
    assert cfg.checkpoint_steps() == [195, 210, 225, 240]  # save_steps alone: FT stays small
    assert TrainConfig(method="ft", out=tmp_path, steps=10, save_every=4, save_steps=(5,)).checkpoint_steps() == [4, 5, 8, 10]
    assert TrainConfig(method="ft", out=tmp_path, steps=10, save_every=0).checkpoint_steps() == [10]


def test_method_defaults(tmp_path: Path) -> None:
    assert TrainConfig(method="ft", out=tmp_path).learning_rate == 1e-4
    assert TrainConfig(method="dora", out=tmp_path).learning_rate == 1e-3
    assert TrainConfig(method="dora", out=tmp_path, rslora=True).scaling == pytest.approx(16 / math.sqrt(8))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps must be positive"),
        ({"save_steps": (300,)}, "save steps must lie in 1..240"),
        ({"dropout": 1.0}, "dropout"),
        ({"method": "lora", "magnitude_only": "dense"}, "applies to dora only"),
        ({"target_regex": "("}, "not a valid regex"),
        ({"method": "qlora"}, "unknown method"),
    ],
)
def test_config_rejects_bad_values(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        TrainConfig(**{"method": "dora", "out": tmp_path, **kwargs})


def test_identity_ignores_how_not_what(tmp_path: Path) -> None:
    a = TrainConfig(method="dora", out=tmp_path / "a", resume=False, progress=True, device="cpu")
    b = TrainConfig(method="dora", out=tmp_path / "b", resume=True, progress=False, device="auto")
    assert a.identity() == b.identity()
    assert a.identity() != TrainConfig(method="dora", out=tmp_path / "a", seed=1).identity()
