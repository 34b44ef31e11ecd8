"""Tensor names: wrapper prefixes, matching base to tuned, layer numbers, kinds and layouts.

Pure string logic, no tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

# Prefixes that wrappers add around the same model: DDP/DataParallel, torch.compile, PEFT.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")

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


def is_embedding(name: str) -> bool:
    """True for embedding tables (PEFT treats them as fan_in_fan_out)."""
    return bool(_EMBEDDING_RE.search(module_name(name)))


def is_fan_in_fan_out(name: str, model_type: str | None) -> bool:
    """True if the weight is stored [in, out]: GPT-2 ``Conv1D`` matrices and embeddings."""
    mod = module_name(name)
    if model_type in CONV1D_MODEL_TYPES and mod.rsplit(".", 1)[-1] in CONV1D_KINDS:
        return True
    return is_embedding(name)


def match_names(base: Iterable[str], tuned: Iterable[str]) -> dict[str, str]:
    """Map base tensor names to the tuned checkpoint's names for the same tensors.

    Names are compared after :func:`strip_wrappers`. If the sides still differ by one leading
    prefix (a model saved with its task head, ``bert.encoder...`` vs ``encoder...``), that
    prefix is found from the data and applied.

    Returns:
        ``{base_name: tuned_name}`` for every base tensor found on the tuned side.
    """
    base_list = list(base)
    tuned_canon: dict[str, str] = {}
    for t in tuned:
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
        matrices the paper analyses; embeddings, heads and norms are left out.
    """
    regex = re.compile(pattern) if pattern else None
    keep = []
    for name, shape in names.items():
        if len(shape) < 2:
            continue
        if include_all:
            keep.append(name)
        elif regex is not None:
            if regex.search(module_name(strip_wrappers(name))):
                keep.append(name)
        elif len(shape) == 2 and name.endswith(".weight") and in_repeated_block(name) and not is_embedding(name):
            keep.append(name)
    return keep
