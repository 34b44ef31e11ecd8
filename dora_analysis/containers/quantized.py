"""Quantized checkpoints: weights stored as integer (or 8-bit float) codes beside their scales.

Raw codes are never analysed as weights: their norms and angles are those of the codes, not
of the model. A store that holds quantization companions is wrapped by :func:`wrap`, which
hides the companions from ``keys()`` and answers ``get("X.weight")`` with the dequantized
float32 weight where the format is documented and tested here, and otherwise refuses with
a line that names the tensor and the format.

Dequantized:

* **bitsandbytes LLM.int8()** (``Linear8bitLt``): ``X.weight`` int8 with a per-row scale
  ``X.SCB`` (float32, one per output row) and ``X.weight_format`` (0 = row-major). As
  bitsandbytes' own ``int8_vectorwise_dequant`` does it (``bitsandbytes/_ops.py``, 0.50:
  ``A * stats.view(-1, 1) * 7.874015718698502e-3``, i.e. W = CB * SCB / 127), in float32.
* **compressed-tensors** int8 / float8 (``X.weight`` with ``X.weight_scale`` and an optional
  ``X.weight_zero_point``): W = (q - zero_point) * scale, the library's ``dequantize``
  (``compressed_tensors/quantization/lifecycle/forward.py``), with a per-tensor scale
  (shape ``[]`` or ``[1]``), per-channel (``[out]`` or ``[out, 1]``) or per-group
  (``[out, groups]``, groups dividing ``in``).

Refused, naming the format: bitsandbytes 4-bit (packed ``uint8`` with ``weight.absmax`` /
``weight.quant_state.bitsandbytes__nf4|fp4``), int8 in a tiled layout (``weight_format`` not
row), block-wise FP8 (``weight_scale_inv``), GPTQ / AWQ (``qweight``) and compressed-tensors
packed int4 (``weight_packed``).
"""

from __future__ import annotations

import re

import torch

from ..errors import InputError
from .base import TensorStore

# bitsandbytes' reciprocal of 127, as its dequantization kernel writes it.
_INV_127 = 7.874015718698502e-3

# Companion tensors by the suffix after the module name, and what they belong to.
_COMPANION_RE = re.compile(
    r"\.(SCB|weight_format|weight_scale|weight_zero_point|weight_scale_inv|weight_g_idx|weight_shape|input_scale|"
    r"output_scale|qzeros|scales|g_idx|weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..*))$"
)
# Packed weights stored under another name: (suffix, format).
_PACKED = ((".qweight", "GPTQ / AWQ packed int4 (qweight)"), (".weight_packed", "compressed-tensors packed int4 (weight_packed)"))


def _owner(companion: str) -> str:
    """The module a companion tensor belongs to: ``layer.0.q.SCB`` -> ``layer.0.q``."""
    m = _COMPANION_RE.search(companion)
    assert m is not None
    return companion[: m.start()]


def holds_quantization(keys: list[str]) -> bool:
    """True if any name is a quantization companion or a packed weight."""
    return any(_COMPANION_RE.search(k) or k.endswith(tuple(s for s, _ in _PACKED)) for k in keys)


class QuantizedStore(TensorStore):
    """A store whose quantized weights read as float32 weights (or refuse, naming the format).

    Args:
        inner: The container as stored (safetensors, pickle, shards ...).
    """

    def __init__(self, inner: TensorStore) -> None:
        super().__init__(inner.path)
        self.inner = inner
        inner_keys = inner.keys()
        present = set(inner_keys)
        self._packed: dict[str, tuple[str, str]] = {}  # virtual X.weight -> (stored name, format)
        for key in inner_keys:
            for suffix, fmt in _PACKED:
                if key.endswith(suffix):
                    weight = key[: -len(suffix)] + ".weight"
                    if weight not in present:
                        self._packed[weight] = (key, fmt)
        hidden = {k for k in inner_keys if _COMPANION_RE.search(k) and f"{_owner(k)}.weight" in present | set(self._packed)}
        self._keys = [k for k in inner_keys if k not in hidden and k not in {s for s, _ in self._packed.values()}]
        self._keys += list(self._packed)
        self._present = present

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._packed:
            return self.inner.shape(self._packed[key][0])
        return self.inner.shape(key)

    def dtype(self, key: str) -> torch.dtype | None:
        if key in self._packed:
            return None
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and (self._has(module, ".SCB") or self._has(module, ".weight_scale")):
            return torch.float32  # what get() returns: dequantized
        return self.inner.dtype(key)

    @property
    def config(self) -> dict:  # type: ignore[override]
        return self.inner.config

    def held_bytes(self) -> int:
        return self.inner.held_bytes()

    def _has(self, module: str, suffix: str) -> bool:
        return f"{module}{suffix}" in self._present

    def _read(self, key: str) -> torch.Tensor:
        if key in self._packed:
            raise self._refuse(key, self._packed[key][1])
        if not key.endswith(".weight"):
            return self.inner.get(key)
        module = key[: -len(".weight")]
        if any(k.startswith(f"{key}.quant_state.") for k in self._present) or self._has(key, ".absmax"):
            fmt = next((k.rsplit("__", 1)[-1] for k in self._present if k.startswith(f"{key}.quant_state.bitsandbytes__")), "4-bit")
            raise self._refuse(key, f"bitsandbytes packed 4-bit ({fmt})")
        if self._has(module, ".weight_scale_inv"):
            raise self._refuse(key, "block-wise FP8 (weight_scale_inv)")
        if self._has(module, ".SCB"):
            return self._int8_rowwise(key, module)
        if self._has(module, ".weight_scale"):
            return self._scaled(key, module)
        return self.inner.get(key)

    def _refuse(self, key: str, fmt: str) -> InputError:
        return InputError(
            f"quantized weight in {fmt} format: its codes are not weights, and this format is not dequantized here",
            path=self.path,
            tensor=key,
            hint="analyse the unquantized checkpoint (or dequantize it with its own library and save that)",
        )

    def _int8_rowwise(self, key: str, module: str) -> torch.Tensor:
        """bitsandbytes LLM.int8(): W = CB * SCB / 127 per row, in float32."""
        codes, scb = self.inner.get(key), self.inner.get(f"{module}.SCB")
        if self._has(module, ".weight_format"):
            layout = self.inner.get(f"{module}.weight_format")
            if layout.numel() != 1 or int(layout.reshape(-1)[0]) != 0:
                raise self._refuse(key, "bitsandbytes int8 in a tiled layout (weight_format not row)")
        if codes.dtype != torch.int8 or codes.ndim != 2 or scb.shape not in ((codes.shape[0],), (codes.shape[0], 1)):
            raise InputError(
                f"bitsandbytes int8 weight expects int8 [out, in] codes and one SCB scale per row, got {codes.dtype} "
                f"{tuple(codes.shape)} and SCB {tuple(scb.shape)}",
                path=self.path,
                tensor=key,
            )
        return codes.to(torch.float32) * scb.to(torch.float32).view(-1, 1) * _INV_127

    def _scaled(self, key: str, module: str) -> torch.Tensor:
        """compressed-tensors: W = (q - zero_point) * scale, per tensor, channel or group."""
        codes, scale = self.inner.get(key), self.inner.get(f"{module}.weight_scale").to(torch.float32)
        zero = self.inner.get(f"{module}.weight_zero_point").to(torch.float32) if self._has(module, ".weight_zero_point") else None
        if codes.ndim != 2:
            raise InputError(f"scaled quantized weight expects 2 dimensions, got {tuple(codes.shape)}", path=self.path, tensor=key)
        rows, cols = codes.shape
        q = codes.to(torch.float32)
        if zero is not None and zero.shape != scale.shape:
            raise InputError(
                f"weight_zero_point {tuple(zero.shape)} does not match weight_scale {tuple(scale.shape)}", path=self.path, tensor=key
            )
        if scale.numel() == 1:  # per tensor
            return (q - (0.0 if zero is None else zero.reshape(()))) * scale.reshape(())
        if scale.shape in ((rows,), (rows, 1)):  # per channel
            z = 0.0 if zero is None else zero.view(rows, 1)
            return (q - z) * scale.view(rows, 1)
        if scale.ndim == 2 and scale.shape[0] == rows and cols % scale.shape[1] == 0:  # per group along the input
            size = cols // scale.shape[1]
            s = scale.repeat_interleave(size, dim=1)
            z = 0.0 if zero is None else zero.repeat_interleave(size, dim=1)
            return (q - z) * s
        raise InputError(
            f"weight_scale of shape {tuple(scale.shape)} fits no documented layout for a weight of {tuple(codes.shape)} "
            "(per tensor [], per channel [out, 1], per group [out, in/group])",
            path=self.path,
            tensor=key,
        )

    def __repr__(self) -> str:
        return f"QuantizedStore({self.inner!r})"


def wrap(store: TensorStore) -> TensorStore:
    """``store`` itself, or a :class:`QuantizedStore` around it if it holds quantized weights."""
    if isinstance(store, QuantizedStore) or not holds_quantization(store.keys()):
        return store
    return QuantizedStore(store)
