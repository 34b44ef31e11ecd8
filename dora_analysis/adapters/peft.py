"""PEFT adapter folders: ``adapter_config.json`` beside ``adapter_model.safetensors`` (or ``.bin``).

Key layout, as ``peft.utils.save_and_load.get_peft_model_state_dict`` writes it: every key
starts ``base_model.model.`` followed by the module's path in the model given to
``get_peft_model``, and the adapter name is removed ("if the adapter name is `'default'` and the
original key is `'model.q_proj.lora_A.default.weight'`, the returned key will be
`'model.q_proj.lora_A.weight'`"). For LoRA:

* ``<module>.lora_A.weight`` ``[r, in, *kernel]`` and ``<module>.lora_B.weight``
  ``[out, r, *ones]`` (Linear, GPT-2 ``Conv1D``, Conv1d/2d/3d);
* ``<module>.lora_embedding_A`` ``[r, num_embeddings]`` and ``<module>.lora_embedding_B``
  ``[embedding_dim, r]`` (Embedding);
* ``<module>.lora_B.bias`` ``[out]`` with ``lora_bias=True``;
* ``<module>.lora_magnitude_vector`` with DoRA (no ``.weight``: "we want the state_dict format
  not to change, we remove the "weight" part", ``LoraModel._get_adapter_state_dict``);
* anything else is a tensor saved outright that PEFT loads into the model in place of the
  base's: ``modules_to_save`` (``<module>.<param>``), trained biases (``bias="all"`` /
  ``"lora_only"``) and embeddings saved with the adapter (``<module>.base_layer.<param>``).

This module holds what all PEFT-format readers share (the config, the key split,
``modules_to_save``) and the LoRA / DoRA reader; VeRA is in :mod:`.vera`, the official DoRA
layout (an older PEFT fork) in :mod:`.official`.
"""

from __future__ import annotations

import json
import math
import re
from abc import abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .. import names as nm
from ..containers import TensorStore
from ..errors import InputError
from ..peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_scale
from .snapshot import AdapterSnapshot, Target, pair_shapes

# PEFT types that learn virtual tokens or prefixes and leave every weight as it was.
WEIGHT_FREE_TYPES = frozenset(
    {"PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT", "CPT", "CARTRIDGE"}
)

# LoraConfig options whose merge is not W0 + s·B·A, or that change more than target weights.
UNSUPPORTED_LORA_OPTIONS = (
    "use_bdlora",
    "kasa_config",
    "arrow_config",
    "velora_config",
    "alora_invocation_tokens",
    "use_qalora",
    "target_parameters",
    "layer_replication",
    "trainable_token_indices",
    "megatron_config",
)

# `init_lora_weights` values with which PEFT rewrites the base layer when the adapter is made
# (e.g. PiSSA: `weight = weight.data - self.scaling[adapter_name] * lora_B @ lora_A`), so the
# saved adapter only reproduces the tuned model on that rewritten base.
BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")

# Keys that mark a file as PEFT-style even without its config.
_PEFT_KEY = re.compile(r"\.(lora_A\.weight|lora_embedding_A|vera_lambda_b|weight_m_wdecomp\.weight)$")

V = TypeVar("V")


def read_config(folder: Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adapter folder.

    Raises:
        InputError: Missing, unreadable, or not a JSON object.
    """
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise InputError(
            f"no {ADAPTER_CONFIG} beside the adapter weights",
            path=folder,
            hint="the config holds r, lora_alpha and the other settings the merge needs; copy it from where the adapter was saved",
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable adapter config ({exc})", path=path) from exc
    if not isinstance(config, dict):
        raise InputError("adapter config is not a JSON object", path=path)
    return config


def find_weights(folder: Path) -> Path:
    """``adapter_model.safetensors``, else ``adapter_model.bin``, in ``folder``."""
    for name in ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise InputError(f"adapter folder holds no {' or '.join(ADAPTER_WEIGHTS)}", path=folder)


def looks_like_peft(keys: list[str]) -> bool:
    """True if some key is a PEFT-style adapter tensor (``...lora_A.weight`` and the like)."""
    return any(_PEFT_KEY.search(k) for k in keys)


def pattern_value(patterns: Mapping[str, V], module: str, default: V) -> V:
    """A module's entry in ``rank_pattern`` / ``alpha_pattern``, as PEFT finds it.

    PEFT (``peft.utils.other.get_pattern_key``) takes the first pattern key, in the mapping's
    order, for which ``re.match(rf"(.*\\.)?({key})$", module)`` matches: a regex matched
    against the whole module path or any dotted suffix of it.

    Args:
        patterns: ``{pattern: value}`` from ``adapter_config.json``.
        module: The module path relative to the model (``transformer.h.0.attn.c_attn``).
        default: ``r`` or ``lora_alpha``.
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


class PeftAdapter(AdapterSnapshot):
    """What every PEFT-format adapter shares: its config, its key split, ``modules_to_save``.

    Subclasses name their per-module tensors in :attr:`PARAMS` and turn each module's tensors
    into a :class:`~.snapshot.Target` in :meth:`_target`.

    Args:
        path: The folder (or weights file) the user named.
        config: The parsed ``adapter_config.json``.
        store: The adapter's tensors.
    """

    # Per-module tensor names, as they end the stored keys.
    PARAMS: ClassVar[tuple[str, ...]] = ()
    # Keys outside any module (VeRA's shared projections).
    SHARED: ClassVar[frozenset[str]] = frozenset()
    # A path component starting like this is an adapter tensor, never a base tensor.
    _ADAPTER_PARTS = ("lora_", "vera_", "weight_m_wdecomp")

    def __init__(self, path: Path, config: dict[str, Any], store: TensorStore) -> None:
        self.store = store
        self.config = config
        self.config_path = store.path.parent / ADAPTER_CONFIG
        self._check_config()
        groups, replacements = self._split_keys()
        targets = {module: self._target(module, params) for module, params in groups.items()}
        super().__init__(
            path,
            store,
            method=self._method(),
            targets=targets,
            replacements=replacements,
            fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        )

    def _check_config(self) -> None:
        """Refuse settings this reader cannot merge exactly (default: accept all)."""

    @abstractmethod
    def _method(self) -> str:
        """The ``method`` label: ``lora``, ``dora``, ``vera``."""

    @abstractmethod
    def _target(self, module: str, params: dict[str, str]) -> Target:
        """One module's :class:`~.snapshot.Target` from its ``{param: stored key}``."""

    def _split_keys(self) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
        """Group adapter tensors by module, and collect tensors saved outright.

        Returns:
            ``{module: {param: key}}`` and ``{replaced tensor name: key}``.
        """
        params = sorted(self.PARAMS, key=len, reverse=True)  # `lora_magnitude_vector.weight` first
        groups: dict[str, dict[str, str]] = {}
        replacements: dict[str, str] = {}
        for key in self.store.keys():
            if key in self.SHARED:
                continue
            name = nm.strip_wrappers(key)
            param = next((p for p in params if name.endswith("." + p)), None)
            if param is not None:
                groups.setdefault(name[: -len(param) - 1], {})[param] = key
                continue
            # `<module>.base_layer.<param>`: PEFT loads it into the wrapped base layer, so it
            # replaces the base's `<module>.<param>`. PEFT saves modules_to_save as plain
            # `<module>.<param>`; a `modules_to_save.` component some converters keep is dropped.
            parts = [p for p in name.split(".") if p not in ("base_layer", "modules_to_save")]
            if any(p.startswith(self._ADAPTER_PARTS) for p in parts):
                raise InputError(
                    "unrecognised adapter tensor",
                    path=self.store.path,
                    tensor=key,
                    hint=f"{type(self).__name__} reads {', '.join(self.PARAMS)}",
                )
            replacements[".".join(parts)] = key
        return groups, replacements

    def _error(self, message: str, key: str | None = None, hint: str | None = None) -> InputError:
        """An InputError about this adapter: its weights file, or its config if no key."""
        return InputError(message, path=self.store.path if key else self.config_path, tensor=key, hint=hint)


class PeftLora(PeftAdapter):
    """A PEFT LoRA or DoRA adapter (``peft_type: LORA``).

    W' = W0 + s·B·A with s = ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``),
    ``r`` and ``lora_alpha`` per module from ``rank_pattern`` / ``alpha_pattern``; with
    ``use_dora``, W' = m · (W0 + s·B·A) / ||W0 + s·B·A||, the norm per output feature.
    """

    PARAMS = (
        "lora_A.weight",
        "lora_B.weight",
        "lora_B.bias",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
        "lora_magnitude_vector.weight",
    )
    MAGNITUDE: ClassVar[tuple[str, ...]] = ("lora_magnitude_vector", "lora_magnitude_vector.weight")

    def _check_config(self) -> None:
        self._refuse_torchtune_dora()
        for option in UNSUPPORTED_LORA_OPTIONS:
            if self.config.get(option):
                raise self._error(
                    f"LoRA option {option}={self.config[option]!r} is not supported (its effect is not W0 + s·B·A)",
                    hint="merge the adapter with PEFT's merge_and_unload() and analyse the merged model as a full checkpoint",
                )
        init = str(self.config.get("init_lora_weights", True)).lower()
        if init.startswith(BASE_CHANGING_INITS):
            raise self._error(
                f"init_lora_weights={init!r} rewrote the base weights when the adapter was made, "
                "so this adapter does not apply to the original base",
                hint="save it with save_pretrained(..., path_initial_model_for_weight_conversion=...) "
                "to get an adapter for the original base",
            )

    def _refuse_torchtune_dora(self) -> None:
        """torchtune's DoRA adapter: magnitudes, no ``use_dora``, and q/k magnitudes out of order.

        torchtune writes ``adapter_config.json`` with ``r``, ``lora_alpha``, ``target_modules``
        and ``peft_type`` only (PEFT itself always writes ``use_dora``). Converting to PEFT key
        names, it permutes the q/k ``lora_B`` rows into Hugging Face's rotary order but leaves
        the magnitude vectors in its own, so no merge of this file is the trained model. The
        merged model torchtune saves beside it is.
        """
        if "use_dora" in self.config or not any(nm.strip_wrappers(k).endswith(self.MAGNITUDE) for k in self.store.keys()):
            return
        folder = self.store.path.parent
        index = sorted(folder.glob("model*.safetensors.index.json"))
        shards = sorted(folder.glob("model*.safetensors"))
        merged = index[0] if index else shards[0] if len(shards) == 1 else None
        where = str(merged) if merged else f"the model-*.safetensors torchtune writes into {folder} (its index or single file)"
        raise self._error(
            "DoRA magnitudes without use_dora in the config: a torchtune DoRA adapter, whose q/k magnitude rows are in "
            "a different order from its lora_B rows, so it cannot be merged exactly",
            hint=f"analyse the merged model torchtune saved beside it instead: {where}",
        )

    def _method(self) -> str:
        return "dora" if self.config.get("use_dora") else "lora"

    def _scale(self, module: str) -> tuple[int, float]:
        """``(r, s)`` for one module, as ``LoraModel._create_and_replace`` sets them."""
        # LoraConfig's defaults: r=8, lora_alpha=8.
        rank = self._setting("rank_pattern", module, "r", 8)
        alpha = self._setting("alpha_pattern", module, "lora_alpha", 8)
        if isinstance(rank, bool) or not isinstance(rank, (int, float)) or rank != int(rank) or rank < 1:
            raise self._error(f"r for {module} is {rank!r}: the rank must be a positive integer", hint="check r and rank_pattern")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise self._error(
                f"lora_alpha for {module} is {alpha!r}: it must be a finite number", hint="check lora_alpha and alpha_pattern"
            )
        return int(rank), lora_scale(float(alpha), int(rank), rslora=bool(self.config.get("use_rslora")))

    def _setting(self, patterns_field: str, module: str, field: str, default: object) -> object:
        """``r`` or ``lora_alpha`` for one module: its pattern's value, else the config's, else PEFT's default."""
        patterns = self.config.get(patterns_field) or {}
        if not isinstance(patterns, Mapping):
            raise self._error(f"{patterns_field} must be an object of {{regex: value}}, got {type(patterns).__name__}")
        try:
            return pattern_value(patterns, module, self.config.get(field, default))
        except re.error as exc:
            bad = next((k for k in patterns if not _compiles(k)), "?")
            raise self._error(f"{patterns_field} key {bad!r} is not a valid regular expression ({exc})") from None

    def _target(self, module: str, params: dict[str, str]) -> Target:
        embedding = "lora_embedding_A" in params or "lora_embedding_B" in params
        down_param, up_param = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        down, up = params.get(down_param), params.get(up_param)
        if down is None or up is None:
            raise self._error(f"{module} has no {down_param if down is None else up_param}", key=down or up)
        rank, out, inp, kernel = pair_shapes(self.store, down, up)
        expected_rank, scale = self._scale(module)
        if rank != expected_rank:
            raise self._error(
                f"rank {rank} in the file, but r={expected_rank} for {module} in {ADAPTER_CONFIG} (r / rank_pattern)",
                key=down,
            )
        magnitude = self._magnitude(module, params, out)
        bias = params.get("lora_B.bias")
        if bias is not None and tuple(self.store.shape(bias)) != (out,):
            raise self._error(f"lora_B.bias has shape {list(self.store.shape(bias))}, expected [{out}]", key=bias)
        return Target(
            out_features=out,
            in_features=inp,
            down=down,
            up=up,
            scale=scale,
            magnitude=magnitude,
            bias=bias,
            kernel=kernel,
            # PEFT's DoraEmbeddingLayer(fan_in_fan_out=True): an embedding table is [in, out].
            transposed=True if embedding else (False if kernel else None),
        )

    def _magnitude(self, module: str, params: dict[str, str], out: int) -> str | None:
        """The module's DoRA magnitude key, checked against ``use_dora`` and its length."""
        key = next((params[p] for p in self.MAGNITUDE if p in params), None)
        if (key is not None) != (self._method() == "dora"):
            state = "has" if key is not None else "lacks"
            raise self._error(
                f"{module} {state} a DoRA magnitude, but the adapter's method is {self._method()!r} (use_dora in {ADAPTER_CONFIG})",
                key=key or next(iter(params.values())),
            )
        # Linear: [out]; Conv: [1, out, 1, 1] ("weight_norm = weight.norm(p=2, dim=dim,
        # keepdim=True).transpose(1, 0)"); Embedding: [embedding_dim].
        if key is not None and math.prod(self.store.shape(key)) != out:
            raise self._error(f"magnitude has shape {list(self.store.shape(key))}, expected {out} values", key=key)
        return key
