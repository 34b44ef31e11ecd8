"""What every adapter format shares: matching its targets to base tensors, and serving W'.

A format reader (PEFT, official DoRA, VeRA, kohya) parses its file into

* **targets**: module name -> :class:`Target`, the weights an update changes, with the keys
  of what is stored for them (low-rank factors, or a dense difference), and
* **replacements**: tensor name -> stored key, tensors saved outright that replace the base's
  (PEFT ``modules_to_save``, trained biases, embeddings saved with the adapter).

This class does the rest: :meth:`~AdapterSnapshot.bind` matches names against the base, checks every
shape before anything is computed, and settles each target's storage layout;
:meth:`~AdapterSnapshot.weight` reads one target's factors and builds its W' per call,
keeping nothing. A format whose factors are not stored as B and A (VeRA) overrides
:meth:`AdapterSnapshot._update`; any :class:`~.merge.Update` will do (a dense difference too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import names as nm
from ..containers import TensorStore
from ..decompose import Axis
from ..errors import InputError
from ..snapshot import Snapshot
from .merge import DenseUpdate, LowRankUpdate, Update


@dataclass(frozen=True)
class Target:
    """One weight an adapter changes: where its factors are stored, and their shapes.

    Attributes:
        out_features: Rows of the update (B's first dimension).
        in_features: Columns of the update; None if only the base can tell (VeRA slices its
            shared projections to the base's size; magnitude-only DoRA has no A).
        down: Key of A in the adapter file (VeRA: of ``vera_lambda_d``); None for a
            magnitude-only or a dense update.
        up: Key of B (VeRA: of ``vera_lambda_b``).
        scale: s, the factor on B·A.
        magnitude: Key of DoRA's magnitude vector, if any.
        magnitude_axis: Which features the magnitude runs along.
        bias: Key of B's own bias (PEFT ``lora_bias``), or of a dense update's bias
            difference: either way it also changes the module's bias.
        kernel: Convolution kernel of A (``(3, 3)``), ``()`` for matrices.
        transposed: True if the base stores this weight ``[in, out]`` whatever its shape
            says (embeddings); False if never (convolutions); None to decide from the base.
        diff: Key of a dense difference ΔW (layer frame), for formats that store the whole
            update (LyCORIS ``full``); then ``down`` and ``up`` are None.
    """

    out_features: int
    in_features: int | None
    down: str | None
    up: str | None
    scale: float = 1.0
    magnitude: str | None = None
    magnitude_axis: Axis = "out"
    bias: str | None = None
    kernel: tuple[int, ...] = ()
    transposed: bool | None = None
    diff: str | None = None

    @property
    def key(self) -> str:
        """A stored tensor of this target, to name in messages."""
        return next(k for k in (self.down, self.up, self.magnitude, self.diff) if k is not None)


@dataclass(frozen=True)
class Layout:
    """How a target's base weight is stored, settled by :meth:`AdapterSnapshot.bind`."""

    transposed: bool
    in_features: int


class AdapterSnapshot(Snapshot):
    """An adapter as a :class:`~dora_analysis.runs.Snapshot`: W' computed from the base.

    Args:
        path: The adapter folder or file the user named.
        store: The adapter's tensors.
        method: ``"lora"``, ``"dora"``, ``"vera"``.
        targets: Module name (as the adapter names it) -> :class:`Target`.
        replacements: Tensor name (as the adapter names it) -> key in ``store``.
        fan_in_fan_out: The adapter's own ``fan_in_fan_out`` setting: the layout of a square
            weight when the base's ``config.json`` does not name a model type.
    """

    complete = False
    # Added to DoRA's norm before dividing: 0 as in PEFT; LyCORIS adds float32 eps.
    norm_eps: float = 0.0
    # What joins path components in this format's names (kohya: "_").
    _separator: str = "."

    def __init__(
        self,
        path: Path,
        store: TensorStore,
        *,
        method: str,
        targets: dict[str, Target],
        replacements: dict[str, str],
        fan_in_fan_out: bool = False,
    ) -> None:
        self.path = path
        self.store = store
        self.method = method
        self.targets = targets
        self.replacements = replacements
        self.fan_in_fan_out = fan_in_fan_out
        self._bound: dict[str, str] = {}  # base tensor name -> adapter tensor name
        self._layouts: dict[str, Layout] = {}  # target module -> layout in the base

    def held_bytes(self) -> int:
        return self.store.held_bytes()

    # -- what each format provides ---------------------------------------------------------

    def _update(self, module: str, layout: Layout) -> Update:
        """Read one target's stored update (called per :meth:`weight`, so nothing is cached)."""
        t = self.targets[module]
        if t.diff is not None:
            return DenseUpdate(diff=self.store.get(t.diff), bias=None if t.bias is None else self.store.get(t.bias))
        if t.down is None or t.up is None:
            # Magnitude only (the official DoRA code's `Wdecompose` modules): an empty B·A.
            down, up = torch.zeros(0, layout.in_features, *t.kernel), torch.zeros(t.out_features, 0)
        else:
            down, up = self.store.get(t.down), self.store.get(t.up)
        return LowRankUpdate(
            down=down,
            up=up,
            scale=t.scale,
            magnitude=None if t.magnitude is None else self.store.get(t.magnitude),
            magnitude_axis=t.magnitude_axis,
            norm_eps=self.norm_eps,
            bias=None if t.bias is None else self.store.get(t.bias),
        )

    def _form(self, base_name: str) -> str | None:
        """A base tensor name as this format writes names (None: never a target)."""
        return nm.strip_wrappers(base_name)

    def _variants(self, name: str) -> list[str]:
        """An adapter tensor name in that form, most specific first."""
        return [nm.strip_wrappers(name)]

    def _match(self, base: TensorStore, wanted: list[str]) -> dict[str, str]:
        """Map adapter tensor names to base tensor names (absent: the base lacks them).

        Names are compared in :meth:`_form` (PEFT: dotted paths without wrapper prefixes).
        An exact match wins; failing that, one name may extend the other by leading path
        components (an adapter trained on ``XForCausalLM``, ``model.layers.0...``, and a base
        saved from ``XModel``, ``layers.0...``, or the other way round) if only one base
        tensor fits.

        Raises:
            InputError: Several base tensors fit one adapter tensor.
        """
        index: dict[str, list[str]] = {}
        for name in base.keys():
            form = self._form(name)
            if form is not None:
                index.setdefault(form, []).append(name)
        sep = self._separator
        matched: dict[str, str] = {}
        for tuned in wanted:
            variants = self._variants(tuned)
            found = next((index[v] for v in variants if v in index), None)
            if found is None:
                found = sorted(
                    {
                        n
                        for form, names in index.items()
                        for v in variants
                        if form.endswith(sep + v) or v.endswith(sep + form)
                        for n in names
                    }
                )
            if len(found) > 1:
                raise InputError(
                    f"{tuned} fits several base tensors ({', '.join(found[:3])})",
                    path=self.store.path,
                    tensor=self._key_of(tuned),
                    hint="give the base of this one model rather than a bundle of several",
                )
            if found:
                matched[tuned] = found[0]
        return matched

    # -- the Snapshot interface ---------------------------------------------------------------

    def bind(self, base: TensorStore) -> set[str]:
        """Match this adapter to ``base``; return the base tensor names it changes.

        Every shape is checked here, so a mismatch stops the analysis before any output.

        Raises:
            InputError: A target the base lacks, or a shape that does not fit.
        """
        wanted = [f"{m}.{p}" for m, t in self.targets.items() for p in (("weight", "bias") if t.bias else ("weight",))]
        wanted += [n for n in self.replacements if n not in wanted]
        matched = self._match(base, wanted)
        model_type = base.config.get("model_type")
        bound: dict[str, str] = {}
        layouts: dict[str, Layout] = {}
        for module, target in self.targets.items():
            weight_name = self._require(matched, f"{module}.weight", target.key)
            layouts[module] = self._layout(target, base.shape(weight_name), weight_name, model_type)
            bound[weight_name] = f"{module}.weight"
            if target.bias:
                bias_name = self._require(matched, f"{module}.bias", target.key)
                self._check_shape(base.shape(bias_name), (target.out_features,), target.key, bias_name)
                bound[bias_name] = f"{module}.bias"
        for name, key in self.replacements.items():
            if name not in matched:
                # A module saved whole that the base does not have (a new task head): it
                # replaces nothing, so there is nothing to compare.
                continue
            self._check_shape(base.shape(matched[name]), self.store.shape(key), key, matched[name])
            bound[matched[name]] = name
        self._bound, self._layouts = bound, layouts
        return set(bound)

    def weight(self, name: str, base_weight: torch.Tensor) -> torch.Tensor:
        """W' for base tensor ``name`` (returned by :meth:`bind`), float32, laid out like the base."""
        tuned = self._bound[name]
        key = self.replacements.get(tuned)
        # A tensor saved with the adapter is what PEFT loads into the base layer before merging.
        w = base_weight if key is None else self.store.get(key)
        module, param = tuned.rsplit(".", 1)
        if module in self._layouts and param in ("weight", "bias"):
            update = self._update(module, self._layouts[module])
            if param == "weight":
                return update.apply(w, transposed=self._layouts[module].transposed)
            return update.apply_bias(w)
        return w.to(torch.float32)

    def update_for(self, name: str) -> Update | None:
        """The update :meth:`weight` applies to base tensor ``name`` (a bound weight target),
        read from the file; None for a bias, a tensor saved outright, or a target whose weight
        is replaced before merging (then W' - W0 is not the update)."""
        tuned = self._bound.get(name)
        module, _, param = (tuned or "").rpartition(".")
        if param != "weight" or module not in self._layouts or tuned in self.replacements:
            return None
        return self._update(module, self._layouts[module])

    def stored_transposed(self, name: str) -> bool | None:
        """The layout :meth:`bind` settled for base tensor ``name`` (None if not a target)."""
        tuned = self._bound.get(name)
        module, _, param = (tuned or "").rpartition(".")
        layout = self._layouts.get(module)
        return layout.transposed if layout is not None and param == "weight" else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, method={self.method!r}, {len(self.targets)} targets)"

    # -- helpers ----------------------------------------------------------------------------

    def _key_of(self, name: str) -> str:
        """The stored key behind an adapter tensor name, for messages."""
        module = name.rsplit(".", 1)[0]
        return self.replacements.get(name) or self.targets[module].key

    def _require(self, matched: dict[str, str], name: str, key: str) -> str:
        if name not in matched:
            raise InputError(
                f"the adapter changes {name!r}, which the base does not have",
                path=self.store.path,
                tensor=key,
                hint="is BASE the model this adapter was trained on?",
            )
        return matched[name]

    def _check_shape(self, base_shape: tuple[int, ...], shape: tuple[int, ...], key: str, base_name: str) -> None:
        if tuple(base_shape) != tuple(shape):
            raise InputError(
                f"shape mismatch: the adapter has {list(shape)}, the base's {base_name} is {list(base_shape)}",
                path=self.store.path,
                tensor=key,
                hint="is BASE the model this adapter was trained on?",
            )

    def _layout(self, target: Target, shape: tuple[int, ...], base_name: str, model_type: str | None) -> Layout:
        """Whether the base stores this target ``[out, in, *kernel]`` or ``[in, out]``."""

        def fits(out: int, inp: int, kernel: tuple[int, ...]) -> bool:
            same_in = target.in_features is None or inp == target.in_features
            return out == target.out_features and same_in and math.prod(kernel) == math.prod(target.kernel)

        straight = len(shape) >= 2 and target.transposed is not True and fits(shape[0], shape[1], shape[2:])
        flipped = len(shape) == 2 and target.transposed is not False and fits(shape[1], shape[0], ())
        if straight and flipped:
            # A square matrix: the shape cannot tell, the layer type can.
            transposed = self._square_is_transposed(base_name, model_type)
        elif straight or flipped:
            transposed = flipped
        else:
            update = [target.out_features, "?" if target.in_features is None else target.in_features, *target.kernel]
            raise InputError(
                f"shape mismatch: the adapter's update is {update}, the base's {base_name} is {list(shape)}",
                path=self.store.path,
                tensor=target.key,
                hint="is BASE the model this adapter was trained on?",
            )
        return Layout(transposed=transposed, in_features=shape[0] if transposed else shape[1])

    def _square_is_transposed(self, base_name: str, model_type: str | None) -> bool:
        """Layout of a square target: GPT-2-style ``Conv1D`` is ``[in, out]``, ``nn.Linear`` is not.

        PEFT decides by layer class: a ``Conv1D`` target forces ``fan_in_fan_out=True`` and an
        ``nn.Linear`` forces it False ("fan_in_fan_out is set to True but the target module is
        `torch.nn.Linear`. Setting fan_in_fan_out to False.", ``dispatch_default``). Without
        the classes, the base's model type names the ``Conv1D`` models; without a model type,
        the adapter's own ``fan_in_fan_out`` decides.
        """
        if model_type is None:
            return self.fan_in_fan_out
        kind = nm.module_name(nm.strip_wrappers(base_name)).rsplit(".", 1)[-1]
        return model_type in nm.CONV1D_MODEL_TYPES and kind in nm.CONV1D_KINDS


def pair_shapes(store: TensorStore, down: str, up: str) -> tuple[int, int, int, tuple[int, ...]]:
    """``(rank, out, in, kernel)`` of a stored B·A pair, checked to fit together.

    Args:
        store: The adapter's tensors.
        down: Key of A, ``[r, in, *kernel]``.
        up: Key of B, ``[out, r, *ones]``.

    Raises:
        InputError: The shapes do not compose (including B of a grouped convolution,
            ``[out, r / groups, 1, 1]``, which PEFT refuses to merge too: "Merging is not
            supported for _ConvNd layers with groups > 1!").
    """
    a, b = store.shape(down), store.shape(up)
    if len(a) < 2 or len(b) < 2 or b[1] != a[0] or math.prod(b[2:]) != 1:
        raise InputError(
            f"factor shapes do not compose: {list(a)} and {list(b)} (expected [r, in, ...] and [out, r, 1, ...])",
            path=store.path,
            tensor=up,
        )
    return a[0], b[0], a[1], tuple(a[2:])
