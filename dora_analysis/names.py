"""Tensor names: wrapper prefixes, matching base to tuned, layer numbers, kinds and layouts.

Pure string logic, no tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

# PEFT's: PeftModel wraps the model as ``base_model`` (the LoraModel), which holds the user's
# model as ``model``; every key an adapter saves starts with it (see peft_format).
PEFT_PREFIX = "base_model.model."

# Prefixes that wrappers add around the same model: DDP/DataParallel, torch.compile, PEFT.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", PEFT_PREFIX)

# Model types whose attention/MLP matrices are GPT-2 ``Conv1D`` ([in, out]).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "decision_transformer", "imagegpt"})
CONV1D_KINDS = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})

# Weights that PEFT treats as fan_in_fan_out ([num_embeddings, dim], magnitude over dim).
_EMBEDDING_RE = re.compile(r"(^|\.)(embed_tokens|word_embeddings|position_embeddings|token_type_embeddings|wte|wpe|embeddings?|shared)$")

# A numbered block: `layers.3.`, `h.3.`, `layer.3.`, `blocks.3.` ...
_BLOCK_RE = re.compile(r"\.(\d+)\.")


def strip_wrappers(name: str) -> str:
    """Remove wrapper prefixes (``module.``, ``_orig_mod.``, ``base_model.model.``), repeatedly."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    return name


def module_name(tensor_name: str) -> str:
    """The module's dotted path: the tensor name without a trailing ``.weight``."""
    return tensor_name[: -len(".weight")] if tensor_name.endswith(".weight") else tensor_name


def layer_index(name: str) -> int | None:
    """The block index of a name (first numeric path component), or None outside blocks.

    >>> layer_index("model.layers.12.self_attn.q_proj.weight")
    12
    """
    m = _BLOCK_RE.search("." + name + ".")
    return int(m.group(1)) if m else None


def in_repeated_block(name: str) -> bool:
    """True if the name lies inside a numbered, repeated block (``...layers.N....``)."""
    return layer_index(name) is not None


def kinds(modules: Iterable[str]) -> dict[str, str]:
    """The matrix kind of each module: the shortest tail of its in-block path that is unique.

    Usually the last name part (``q_proj``, ``query``, ``c_attn``); when that part names two
    different matrices of a block (BERT's ``attention.output.dense`` and ``output.dense``),
    enough of the path is kept to tell them apart.
    """
    tails: dict[str, tuple[str, ...]] = {}
    for mod in modules:
        parts = mod.split(".")
        idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        tails[mod] = tuple(parts[idx + 1 :] if idx is not None and idx + 1 < len(parts) else parts[-1:])
    distinct = set(tails.values())
    out: dict[str, str] = {}
    for mod, tail in tails.items():
        for n in range(1, len(tail) + 1):
            suffix = tail[-n:]
            if all(other == tail or other[-n:] != suffix for other in distinct):
                break
        out[mod] = ".".join(suffix)
    return out


# The order a block applies its matrices, attention (queries, keys, values, then its output)
# before the MLP (gate, up, down), as :func:`kinds` names them in the common families. Checkpoint
# files list tensors alphabetically (``mlp.down_proj`` before ``self_attn.q_proj``), so the files
# cannot give this order.
BLOCK_ORDER = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # LLaMA, Mistral, Qwen
    "query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense",  # BERT
    "c_attn", "attn.c_proj", "c_fc", "mlp.c_proj",  # GPT-2
)  # fmt: skip


def kind_order(names: Iterable[str]) -> list[str]:
    """Matrix kinds in the order a block applies them (:data:`BLOCK_ORDER`), others after, alphabetically.

    Example:
        >>> kind_order(["down_proj", "q_proj", "rotary", "k_proj"])
        ['q_proj', 'k_proj', 'down_proj', 'rotary']
    """
    rank = {kind: i for i, kind in enumerate(BLOCK_ORDER)}
    return sorted(set(names), key=lambda kind: (rank.get(kind, len(rank)), kind))


def is_embedding(name: str) -> bool:
    """True for embedding tables (PEFT treats them as fan_in_fan_out)."""
    return bool(_EMBEDDING_RE.search(module_name(name)))


def is_fan_in_fan_out(name: str, model_type: str | None) -> bool:
    """True if the weight is stored [in, out]: GPT-2 ``Conv1D`` matrices and embeddings."""
    mod = module_name(name)
    if model_type in CONV1D_MODEL_TYPES and mod.rsplit(".", 1)[-1] in CONV1D_KINDS:
        return True
    return is_embedding(name)


def is_conv1d_kind(name: str) -> bool:
    """True for the names GPT-2's ``Conv1D`` matrices have (``c_attn``, ``c_proj``, ``c_fc``, ``q_attn``).

    The names alone do not settle the layout: GPTBigCode (StarCoder) uses the same names for
    ``nn.Linear`` matrices stored ``[out, in]``.
    """
    return module_name(name).rsplit(".", 1)[-1] in CONV1D_KINDS


def conv1d_layout_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> bool | None:
    """Whether GPT-2-style matrices are stored ``[in, out]`` (Conv1D), as far as their shapes tell.

    The MLP's up-projection ``c_fc`` and the fused ``c_attn`` have more outputs than inputs in
    every model that uses these names (4x and 3x in GPT-2; in GPTBigCode's multi-query
    ``c_attn`` hidden + 2 x head_dim). So a wide ``[a, b]`` with ``b > a`` is ``[in, out]``
    and a tall one is ``[out, in]``. Returns None when there is no such matrix, a square
    one, or the matrices disagree: the layout cannot be known from the file.
    """
    votes = set()
    for name, shape in shapes.items():
        if len(shape) == 2 and name.endswith(".weight") and module_name(name).rsplit(".", 1)[-1] in ("c_fc", "c_attn"):
            votes.add(None if shape[0] == shape[1] else shape[1] > shape[0])
    return votes.pop() if len(votes) == 1 else None


# An output head that a checkpoint may omit because it is the input embedding
# (``tie_word_embeddings``), and the input embeddings it can be tied to.
_TIED_HEAD_RE = re.compile(r"(^|\.)lm_head\.weight$")
_WORD_EMBEDDING_RE = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|shared|embed_in)\.weight$")


def is_tied_head(name: str) -> bool:
    """True for an output head that tied models leave out of their checkpoints (``lm_head.weight``)."""
    return bool(_TIED_HEAD_RE.search(strip_wrappers(name)))


def word_embedding(names: Iterable[str]) -> str | None:
    """The one input-embedding table among ``names`` (``embed_tokens.weight``, ``wte.weight`` ...), or None."""
    found = [n for n in names if _WORD_EMBEDDING_RE.search(strip_wrappers(n))]
    return found[0] if len(found) == 1 else None


def wrapper_collisions(names: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs of names that are the same tensor once wrapper prefixes are stripped (``module.X`` and ``X``)."""
    seen: dict[str, str] = {}
    clashes = []
    for name in names:
        canon = strip_wrappers(name)
        if canon in seen:
            clashes.append((seen[canon], name))
        else:
            seen[canon] = name
    return clashes


class NameCollision(ValueError):
    """Two tensors of one checkpoint that name the same tensor once wrapper prefixes are stripped.

    Pure vocabulary: the caller, which knows the file, turns it into an ``InputError``.

    Attributes:
        side: ``"base"`` or ``"tuned"``: which checkpoint holds both.
        pair: The two names.
    """

    hint = "which one holds the weights is not knowable; save the checkpoint without the duplicate"

    def __init__(self, side: str, pair: tuple[str, str]) -> None:
        self.side, self.pair = side, pair
        super().__init__(
            f"two tensors are the same once wrapper prefixes ({', '.join(WRAPPER_PREFIXES)}) are stripped: {pair[0]!r} and {pair[1]!r}"
        )


class InvalidPattern(ValueError):
    """A module pattern that is not a regular expression (the caller says which option gave it)."""


def match_names(base: Iterable[str], tuned: Iterable[str]) -> dict[str, str]:
    """Map base tensor names to the tuned checkpoint's names for the same tensors.

    Names are compared after :func:`strip_wrappers`. If the sides still differ by one leading
    prefix (a model saved with its task head, ``bert.encoder...`` vs ``encoder...``), that
    prefix is found from the data and applied.

    Returns:
        ``{base_name: tuned_name}`` for every base tensor found on the tuned side.

    Raises:
        NameCollision: One side holds two names for one tensor (``module.X`` and ``X``).
    """
    base_list = list(base)
    tuned_list = list(tuned)
    for side, names in (("base", base_list), ("tuned", tuned_list)):
        clashes = wrapper_collisions(names)
        if clashes:
            raise NameCollision(side, clashes[0])
    tuned_canon: dict[str, str] = {}
    for t in tuned_list:
        tuned_canon.setdefault(strip_wrappers(t), t)
    base_canon = {b: strip_wrappers(b) for b in base_list}

    def apply(prefix_add: str, prefix_drop: str) -> dict[str, str]:
        out = {}
        for b, c in base_canon.items():
            if prefix_drop:
                if not c.startswith(prefix_drop):
                    continue
                c = c[len(prefix_drop) :]
            key = prefix_add + c
            if key in tuned_canon:
                out[b] = tuned_canon[key]
        return out

    best = apply("", "")
    if len(best) == len(base_list) or not base_list:
        return best
    # Try a prefix seen on a few names: tuned has extra ("bert." + name) or base has extra.
    candidates: set[tuple[str, str]] = set()
    probes = [c for c in base_canon.values() if in_repeated_block(c)][:8] or list(base_canon.values())[:8]
    for c in probes:
        for t in tuned_canon:
            if t.endswith("." + c):
                candidates.add((t[: -len(c)], ""))
            elif c.endswith("." + t):
                candidates.add(("", c[: -len(t)]))
    for add, drop in candidates:
        mapped = apply(add, drop)
        if len(mapped) > len(best):
            best = mapped
    return best


def select(
    names: Mapping[str, tuple[int, ...]],
    pattern: str | None = None,
    *,
    include_all: bool = False,
) -> list[str]:
    """Which tensors to analyse.

    Args:
        names: Tensor name -> shape.
        pattern: Regex searched in the module name (tensor name without ``.weight``); tensors
            with at least 2 dimensions that match are kept.
        include_all: Keep every tensor with at least 2 dimensions (embeddings, heads too).

    Returns:
        Default (no pattern): the 2-D weights inside numbered, repeated blocks, which are the
        matrices the paper analyses; embeddings, heads and norms are left out. A matrix with
        no rows or no columns holds no vector to measure and is never selected.

    Raises:
        InvalidPattern: ``pattern`` is not a valid regular expression.
    """
    try:
        regex = re.compile(pattern) if pattern else None
    except re.error as exc:
        raise InvalidPattern(f"{pattern!r} is not a valid regular expression ({exc})") from None
    keep = []
    for name, shape in names.items():
        if len(shape) < 2 or 0 in shape:
            continue
        if include_all:
            keep.append(name)
        elif regex is not None:
            if regex.search(module_name(strip_wrappers(name))):
                keep.append(name)
        elif len(shape) == 2 and name.endswith(".weight") and in_repeated_block(name) and not is_embedding(name):
            keep.append(name)
    return keep
