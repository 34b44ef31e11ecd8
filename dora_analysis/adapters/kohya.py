"""kohya-ss / LyCORIS LoRA files (Stable Diffusion and other diffusion LoRAs): one ``.safetensors``.

Keys are ``<stem>.<param>``, the stem being the module's dotted path with ``.`` replaced by
``_`` behind a prefix that says which model it belongs to (``lora_unet_``, ``lora_te_``,
``lora_te1_`` / ``lora_te2_`` for SDXL's two text encoders, ``lycoris_`` ...):

* ``<stem>.lora_down.weight`` ``[r, in, *kernel]`` and ``<stem>.lora_up.weight``
  ``[out, r, *ones]``;
* ``<stem>.alpha``, a scalar: s = alpha / r (``self.scale = alpha / self.lora_dim``, where a
  missing or zero alpha means alpha = r);
* ``<stem>.dora_scale`` for DoRA (LyCORIS): ``[out, 1, ...]`` since LyCORIS 3.2.0
  (``wd_on_out=True``), ``[1, in, ...]`` before. Its orientation tells the axis; a flattened
  ``[n]`` scale of a square weight cannot, and then the axis must be given.

LyCORIS merges DoRA as ``weight * (dora_scale / (||weight|| + eps))`` with the norm over every
axis but the scale's and ``eps = torch.finfo(weight.dtype).eps`` (``apply_weight_decompose``).

LyCORIS ``full`` modules store the whole difference: ``<stem>.diff`` in the layer's own shape
and ``<stem>.diff_b`` for the bias, merged as W0 + diff (a dense update: a full fine-tune, method ``ft``).
Other LyCORIS algorithms (LoHa ``hada_*``, LoKr ``lokr_*``, Tucker ``lora_mid``, OFT ...) are
refused with a message naming them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from .. import names as nm
from ..containers import TensorStore
from ..decompose import Axis
from ..errors import InputError
from ..peft_format import lora_scale
from .snapshot import AdapterSnapshot, Target, pair_shapes

PARAMS = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
# LyCORIS `full` (FullModule): the whole difference, stored outright.
DENSE_PARAMS = ("diff", "diff_b")

# Which model a stem belongs to; stripped before matching (longest alternatives first).
_PREFIX = re.compile(r"^(?:lora_prior_unet|lora_unet|lora_transformer|lora_te\d?|lycoris|lora)_")

# `<stem>.<param>` of any kohya / LyCORIS tensor: enough to recognise such a file.
_KEY = re.compile(
    r"^(?P<stem>(?:lora|lycoris)_[^.]+)\."
    r"(?P<param>lora_(?:down|up|mid)\.weight|alpha|dora_scale|hada_\w+|lokr_\w+|diff(?:_b)?|oft_\w+|[wb]_norm"
    r"|on_input|weight|[ab][12]\.weight|bm\.weight)$"
)
# The keys that only LyCORIS IA3 (`.on_input`) and GLoRA (`.a1.weight` ...) write: with them, a
# file of `<stem>.weight` tensors is an adapter, not a full checkpoint.
_LYCORIS_ONLY = re.compile(r"^(?:lora|lycoris)_[^.]+\.(?:on_input|[ab][12]\.weight)$")

_UNSUPPORTED = {
    "lora_mid.weight": "LoCon with Tucker decomposition (lora_mid)",
    "hada_": "LoHa (hada_*)",
    "lokr_": "LoKr (lokr_*)",
    "oft_": "OFT / BOFT (oft_*)",
    "w_norm": "norm-layer tuning (w_norm / b_norm)",
    "b_norm": "norm-layer tuning (w_norm / b_norm)",
    "on_input": "IA3 (weight + on_input)",
    "weight": "IA3 (weight + on_input)",
    "a1.": "GLoRA (a1 / a2 / b1 / b2)",
    "a2.": "GLoRA (a1 / a2 / b1 / b2)",
    "b1.": "GLoRA (a1 / a2 / b1 / b2)",
    "b2.": "GLoRA (a1 / a2 / b1 / b2)",
    "bm.": "GLoRA (a1 / a2 / b1 / b2)",
}


def is_kohya(keys: list[str]) -> bool:
    """True if the keys look like a kohya / LyCORIS network (``lora_unet_..._proj.lora_down.weight``)."""
    # A bare `<stem>.weight` is LyCORIS IA3 only beside `.on_input`: alone it may be a model's own tensor.
    lycoris_only = any(_LYCORIS_ONLY.match(k) for k in keys)
    return any((m := _KEY.match(k)) and (m.group("param") != "weight" or lycoris_only) for k in keys)


def dora_axis_of(shape: tuple[int, ...], out: int, inp: int, option: Axis | None) -> Axis:
    """Which features a ``dora_scale`` runs along, from its shape, else from ``option``.

    Args:
        shape: The stored ``dora_scale`` shape.
        out: Output features of the layer.
        inp: Input features of the layer.
        option: The user's ``dora_axis``, needed only when the shape fits both.

    Raises:
        InputError: The shape fits neither axis, fits both and no option was given, or
            contradicts the option. The caller adds the file and tensor to the message.
    """
    candidates: list[Axis] = []
    if len(shape) >= 2:
        if shape[0] == out and math.prod(shape[1:]) == 1:
            candidates.append("out")
        if shape[0] == 1 and shape[1] == inp and math.prod(shape[2:]) == 1:
            candidates.append("in")
    else:
        n = math.prod(shape)
        candidates += [axis for axis, size in (("out", out), ("in", inp)) if n == size]
    if not candidates:
        raise InputError(f"dora_scale has shape {list(shape)}, which fits neither [{out}, 1] nor [1, {inp}]")
    if len(candidates) == 1:
        if option is not None and option != candidates[0]:
            raise InputError(
                f"dora_scale of shape {list(shape)} runs along the {candidates[0]!r} features, but dora_axis={option!r} was given"
            )
        return candidates[0]
    if option is None:
        raise InputError(
            f"dora_scale of shape {list(shape)} fits both the output and the input axis of this square "
            "matrix, so the file alone cannot tell how to apply it",
            hint="pass dora_axis='out' (LyCORIS >= 3.2.0, wd_on_output) or 'in' (older LyCORIS); CLI: --dora-scale-axis out|in",
        )
    return option


class KohyaLora(AdapterSnapshot):
    """A kohya / LyCORIS LoRA or DoRA file, matched to the base by underscored module names.

    A stem matches the base weight whose module path, with ``.`` replaced by ``_``, equals
    the stem without its prefix (``lora_unet_``, ``lora_te_`` ...), or the whole stem; failing
    that, the one base path that extends it by leading components (a base saved inside a
    bundle, ``unet.down_blocks...``).

    Args:
        path: The ``.safetensors`` file (or the folder holding it) the user named.
        store: Its tensors.
        dora_axis: Axis of a ``dora_scale`` whose shape cannot tell (square weights).
    """

    _separator = "_"
    # LyCORIS `apply_weight_decompose`: `weight_norm = ... .norm(dim=1) ... + torch.finfo(weight.dtype).eps`.
    norm_eps = float(torch.finfo(torch.float32).eps)

    def __init__(self, path: Path, store: TensorStore, *, dora_axis: Axis | None = None) -> None:
        self.store = store
        groups = self._group()
        targets = {stem: self._target(stem, params, dora_axis) for stem, params in groups.items()}
        method = "dora" if any(t.magnitude for t in targets.values()) else "lora"
        if all(t.diff is not None for t in targets.values()):
            method = "ft"
        elif any(t.diff is not None for t in targets.values()):
            raise InputError(
                "the file mixes LyCORIS full differences (diff) with low-rank modules",
                path=store.path,
                hint="analyse each network on its own",
            )
        super().__init__(path, store, method=method, targets=targets, replacements={})

    def _group(self) -> dict[str, dict[str, str]]:
        """``{stem: {param: key}}``, refusing LyCORIS algorithms other than LoRA / LoCon."""
        groups: dict[str, dict[str, str]] = {}
        for key in self.store.keys():
            m = _KEY.match(key)
            if m is None:
                raise InputError(
                    "not a kohya / LyCORIS LoRA tensor",
                    path=self.store.path,
                    tensor=key,
                    hint=f"expected <prefix>_<module>.{{{', '.join(PARAMS)}}}",
                )
            param = m.group("param")
            if param not in PARAMS + DENSE_PARAMS:
                algorithm = next(v for k, v in _UNSUPPORTED.items() if param.startswith(k))
                raise InputError(
                    f"LyCORIS {algorithm} is not supported",
                    path=self.store.path,
                    tensor=key,
                    hint="supported: LoRA / LoCon (lora_down, lora_up, alpha), their DoRA (dora_scale), and full (diff, diff_b)",
                )
            groups.setdefault(m.group("stem"), {})[param] = key
        return groups

    def _target(self, stem: str, params: dict[str, str], dora_axis: Axis | None) -> Target:
        if "diff" in params or "diff_b" in params:
            return self._dense_target(stem, params)
        down, up = params.get("lora_down.weight"), params.get("lora_up.weight")
        if down is None or up is None:
            missing = "lora_down.weight" if down is None else "lora_up.weight"
            raise InputError(f"{stem} has no {missing}", path=self.store.path, tensor=next(iter(params.values())))
        rank, out, inp, kernel = pair_shapes(self.store, down, up)
        magnitude = params.get("dora_scale")
        axis: Axis = "out"
        if magnitude is not None:
            try:
                axis = dora_axis_of(tuple(self.store.shape(magnitude)), out, inp, dora_axis)
            except InputError as exc:
                raise InputError(exc.message, path=self.store.path, tensor=magnitude, hint=exc.hint) from None
        return Target(
            out_features=out,
            in_features=inp,
            down=down,
            up=up,
            scale=lora_scale(self._alpha(params, rank), rank, rslora=False),
            magnitude=magnitude,
            magnitude_axis=axis,
            kernel=kernel,
            transposed=False,  # diffusion models use nn.Linear / nn.Conv2d: [out, in, *kernel]
        )

    def _dense_target(self, stem: str, params: dict[str, str]) -> Target:
        """A LyCORIS ``full`` module: ``diff`` in the layer's shape, ``diff_b`` for its bias."""
        extra = sorted(set(params) - set(DENSE_PARAMS))
        if extra or "diff" not in params:
            what = f"has {', '.join(extra)} beside diff" if extra else "has diff_b but no diff"
            raise InputError(f"{stem} {what}", path=self.store.path, tensor=next(iter(params.values())))
        shape = tuple(self.store.shape(params["diff"]))
        if len(shape) < 2:
            raise InputError(f"diff has shape {list(shape)}, not a weight's", path=self.store.path, tensor=params["diff"])
        bias = params.get("diff_b")
        if bias is not None and tuple(self.store.shape(bias)) != (shape[0],):
            raise InputError(f"diff_b has shape {list(self.store.shape(bias))}, expected [{shape[0]}]", path=self.store.path, tensor=bias)
        return Target(
            out_features=shape[0],
            in_features=shape[1],
            down=None,
            up=None,
            diff=params["diff"],
            bias=bias,
            kernel=shape[2:],
            transposed=False,
        )

    def _alpha(self, params: dict[str, str], rank: int) -> float:
        """``alpha``, where missing or 0 means r (kohya: ``alpha = self.lora_dim if alpha is None or alpha == 0``)."""
        if "alpha" not in params:
            return float(rank)
        stored = self.store.get(params["alpha"])
        if stored.numel() != 1 or not (stored.is_floating_point() or stored.dtype in (torch.int32, torch.int64, torch.int16)):
            raise InputError(
                f"alpha must be one number, got a {str(stored.dtype).removeprefix('torch.')} tensor of shape {list(stored.shape)}",
                path=self.store.path,
                tensor=params["alpha"],
                hint="kohya saves alpha as a scalar (alpha / r is the scale)",
            )
        alpha = float(stored.double().reshape(-1)[0])
        if not math.isfinite(alpha):
            raise InputError(f"alpha is {alpha}", path=self.store.path, tensor=params["alpha"], hint="alpha must be a finite number")
        return alpha if alpha != 0 else float(rank)

    def _form(self, base_name: str) -> str | None:
        """``a.b.0.c.weight`` -> ``a_b_0_c.weight``: module paths as kohya writes them, and the parameter."""
        module, _, param = nm.strip_wrappers(base_name).rpartition(".")
        return f"{module.replace('.', '_')}.{param}" if param in ("weight", "bias") else None

    def _variants(self, name: str) -> list[str]:
        """``lora_unet_a_b.weight`` -> ``a_b.weight`` (prefix stripped), then ``lora_unet_a_b.weight``."""
        stem, param = name.rsplit(".", 1)
        return [f"{_PREFIX.sub('', stem)}.{param}", name]
