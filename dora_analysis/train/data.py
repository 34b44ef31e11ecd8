"""Training data: the built-in synthetic task, user files (JSONL / CSV), and batching.

The batch for a step is a pure function of ``(seed, step)`` (:class:`BatchOrder`), so resuming
a run needs only the step to continue the same data stream.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .config import Noise, TrainConfig, Words

# The synthetic task's words: 12 nouns, and 10 positive + 10 negative adjectives per word set
# (the keys are config.Words, the choices of --words).
NOUNS = ("movie", "book", "meal", "hotel", "song", "game", "show", "car", "phone", "room", "trip", "party")
ADJECTIVES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # Rare, mostly multi-piece words: all-MiniLM-L6-v2 needs the whole run to learn their
    # polarity under negation, so the loss is still falling at step 240 (docs/training.md).
    "rare": (
        ("salutary", "felicitous", "estimable", "sterling", "meritorious", "laudable", "exemplary", "stellar", "sublime", "commendable"),
        ("execrable", "deplorable", "abysmal", "egregious", "lamentable", "insipid", "vapid", "shoddy", "dire", "woeful"),
    ),
    # Everyday single-token words: the rule is learnt in ~90 steps, after which the loss is flat.
    "common": (
        ("good", "great", "excellent", "wonderful", "pleasant", "nice", "fantastic", "superb", "lovely", "perfect"),
        ("bad", "terrible", "awful", "poor", "boring", "horrible", "dull", "ugly", "nasty", "disappointing"),
    ),
}


@dataclass(frozen=True)
class Example:
    """One labelled text."""

    text: str
    label: int


# The synthetic task's defaults are the trainer's.
_TRAINER_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def synthetic_task(
    n: int = _TRAINER_DEFAULTS["synthetic_size"],
    *,
    seed: int = 0,
    negation_p: float = _TRAINER_DEFAULTS["synthetic_negation_p"],
    flip_p: float = _TRAINER_DEFAULTS["synthetic_flip_p"],
    noise: Noise = _TRAINER_DEFAULTS["synthetic_noise"],
    words: Words = _TRAINER_DEFAULTS["synthetic_words"],
) -> list[Example]:
    """Sentences ``"the {noun} was [not ]{adjective}"`` labelled by their meaning, with noise.

    The label is polarity XOR negation (1 for "the movie was good" and "the movie was not bad",
    0 for "the movie was bad" and "the movie was not good"), then flipped with probability
    ``flip_p``. Negation makes the task need more than the adjective's polarity.

    Which labels flip (``noise``):

    * ``"example"`` (default): each occurrence flips independently. The noise cannot be
      learnt: the loss is bounded below by H(flip_p), 0.50 nats for 0.2.
    * ``"sentence"``: each distinct sentence (noun, adjective, negation) is flipped or not, the
      same way every time it occurs: 20% exceptions a model can memorise, so the loss can go
      below H(flip_p).

    Which adjectives (``words``) decides how fast all-MiniLM-L6-v2 learns the rule: the
    ``"common"`` ones (good, bad, ...) by step ~90 of the default run, after which the loss is
    flat; the ``"rare"`` ones (laudable, execrable, ...) take the whole run, and the loss is
    still falling at step 240 (measured in docs/training.md).

    Args:
        n: Number of sentences.
        seed: Seeds every choice (including which sentences flip); the same seed gives the
            same list.
        negation_p: Probability of "not".
        flip_p: Probability that a label is flipped.
        noise: ``"example"`` or ``"sentence"``, see above.
        words: The adjectives, a key of :data:`ADJECTIVES`: ``"rare"`` (default) or ``"common"``.

    Returns:
        ``n`` :class:`Example`, labels in {0, 1}.
    """
    if noise not in ("sentence", "example"):
        raise ValueError(f"noise must be 'sentence' or 'example', got {noise!r}")
    positives, negatives = ADJECTIVES[words]
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        noun = rng.choice(NOUNS)
        positive = rng.random() < 0.5
        adjective = rng.choice(positives if positive else negatives)
        negated = rng.random() < negation_p
        label = int(positive != negated)
        # A str seed is hashed with SHA-512 by `random`: the same on every run and platform.
        draw = random.Random(f"{seed}|{noun}|{adjective}|{negated}").random() if noise == "sentence" else rng.random()
        if draw < flip_p:
            label = 1 - label
        text = f"the {noun} was {'not ' if negated else ''}{adjective}"
        examples.append(Example(text, label))
    return examples


def read_examples(path: str | Path) -> list[Example]:
    """Read a JSONL or CSV file of ``text`` and ``label`` (a non-negative integer).

    JSONL: one object per line, e.g. ``{"text": "a fine film", "label": 1}``; blank lines are
    skipped. CSV: a header row naming at least ``text`` and ``label``.

    Raises:
        InputError: Unknown extension, missing columns, or a bad row (the message gives its line).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("no such data file", path=path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(path)
    elif suffix == ".csv":
        rows = _csv_rows(path)
    else:
        raise InputError("unknown data format", path=path, hint="expected a .jsonl or .csv file with text and label")
    examples = [_example(record, path, line) for line, record in rows]
    if not examples:
        raise InputError("data file holds no examples", path=path)
    return examples


# Labels are class indices and the head gets max(label) + 1 outputs: a stray 10**9 must not
# become a billion-way classifier.
MAX_LABELS = 10_000


def _text(path: Path) -> str:
    """The whole file as text: UTF-8, a leading byte-order mark dropped (spreadsheets write one).

    Raises:
        InputError: Bytes that are not UTF-8, with the line they are on.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror})", path=path) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(
            f"line {line}: bytes that are not UTF-8 ({data[exc.start : exc.start + 1]!r} at byte {exc.start})",
            path=path,
            hint="save the file as UTF-8",
        ) from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSONL file."""
    with io.StringIO(_text(path)) as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise InputError(f"line {line_no}: not valid JSON ({exc.args[0] if exc.args else exc})", path=path) from exc
            if not isinstance(record, dict):
                raise InputError(f"line {line_no}: expected a JSON object with text and label", path=path)
            yield line_no, record


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` for each data row of a CSV file with a header."""
    with io.StringIO(_text(path), newline="") as fh:
        reader = csv.DictReader(fh)
        try:
            columns = reader.fieldnames or []
        except csv.Error as exc:
            raise InputError(f"line 1: not valid CSV ({exc})", path=path) from None
        missing = [c for c in ("text", "label") if c not in columns]
        if missing:
            raise InputError(
                f"line 1: missing column(s) {', '.join(missing)} (found: {', '.join(columns) or 'none'})",
                path=path,
                hint="the first row must be a header naming text and label",
            )
        rows = iter(reader)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error as exc:
                raise InputError(f"line {reader.line_num}: not valid CSV ({exc})", path=path) from None
            if None in row:  # DictReader puts surplus fields under the key None
                raise InputError(f"line {reader.line_num}: more fields than the header has", path=path)
            yield reader.line_num, row


def _example(record: dict[str, Any], path: Path, line: int) -> Example:
    """Validate one row's text and label."""
    missing = [k for k in ("text", "label") if record.get(k) is None]
    if missing:
        raise InputError(f"line {line}: missing {' and '.join(missing)}", path=path)
    text = record["text"]
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"line {line}: text must be a non-empty string", path=path)
    return Example(text, _label(record["label"], path, line))


def _label(value: object, path: Path, line: int) -> int:
    """A label as an int in [0, MAX_LABELS); accepts ints and strings of ASCII digits (CSV cells)."""
    label: int | None = None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        label = value
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        label = int(value.strip())
    if label is None:
        raise InputError(f"line {line}: label must be a non-negative integer, got {str(value)[:40]!r}", path=path)
    if label >= MAX_LABELS:
        raise InputError(
            f"line {line}: label {str(label)[:20]} is out of range: labels are class indices 0 to {MAX_LABELS - 1}",
            path=path,
            hint="number the classes 0, 1, 2 ...",
        )
    return label


def num_labels(examples: Sequence[Example]) -> int:
    """Number of classes the head needs: ``max(label) + 1``, at least 2."""
    return max(2, max(e.label for e in examples) + 1)


@dataclass
class TokenizedData:
    """A dataset tokenized once, padded to its longest text.

    Attributes:
        input_ids: ``[N, L]`` token ids.
        attention_mask: ``[N, L]``, 1 for tokens, 0 for padding.
        labels: ``[N]`` class indices.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, indices: torch.Tensor, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The rows ``indices``, padding columns that no row uses trimmed, on ``device``."""
        mask = self.attention_mask[indices]
        # Right padding: keep up to the longest text in this batch, not the whole dataset's.
        width = int(mask.sum(dim=1).max())
        return {
            "input_ids": self.input_ids[indices, :width].to(device),
            "attention_mask": mask[:, :width].to(device),
            "labels": self.labels[indices].to(device),
        }


def eval_sample(n: int, size: int, seed: int) -> torch.Tensor:
    """Indices of a fixed random sample of ``min(size, n)`` examples (sorted), set by the seed.

    Random rather than the first ``size``: user files are often sorted by label.
    """
    gen = torch.Generator().manual_seed(2**40 + seed)  # a stream apart from BatchOrder's
    return torch.randperm(n, generator=gen)[: min(size, n)].sort().values


def tokenize(examples: Sequence[Example], tokenizer: Any, max_length: int) -> TokenizedData:
    """Tokenize every example once (right padding, truncation at ``max_length`` tokens)."""
    tokenizer.padding_side = "right"
    enc = tokenizer(
        [e.text for e in examples],
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    return TokenizedData(enc["input_ids"], enc["attention_mask"], labels)


class BatchOrder:
    """Which examples each step trains on: a fresh shuffle every epoch, fixed by the seed.

    Batches are full (the remainder of an epoch is dropped), so every step sees
    ``batch_size`` examples. ``indices(step)`` depends only on ``(seed, step)``: a resumed run
    continues the same stream from its step alone.

    Args:
        n: Dataset size (at least ``batch_size``).
        batch_size: Examples per step.
        seed: Seeds every epoch's permutation.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < batch_size:
            raise InputError(f"the data has {n} examples, fewer than the batch size {batch_size}", hint="lower --batch-size")
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = n // batch_size
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch within epoch)`` of 0-based ``step``."""
        return divmod(step, self.per_epoch)

    def indices(self, step: int) -> torch.Tensor:
        """Dataset indices of the batch for 0-based ``step``."""
        epoch, batch = self.position(step)
        if epoch != self._epoch:
            # One generator per epoch, seeded from (seed, epoch): no state to carry across steps.
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=gen)
            self._epoch = epoch
        start = batch * self.batch_size
        return self._perm[start : start + self.batch_size]
