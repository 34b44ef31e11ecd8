"""The safetensors header, checked the way the ``safetensors`` library checks it.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of UTF-8 JSON,
and the data buffer::

    {"__metadata__": {str: str},                                   # optional
     name: {"dtype": "F32", "shape": [4, 3], "data_offsets": [begin, end]}, ...}

Offsets are relative to the data buffer. :func:`parse_header` accepts a file exactly when the
library's own reader (``SafeTensors::read_metadata`` and ``Metadata::validate`` in
``safetensors/src/tensor.rs``, serde-json underneath) would open it, so a file that
``safe_open`` refuses never yields a number here:

* the header length is at most 100 MB and fits in the file;
* the header is a JSON object, with serde-json's rules where Python's ``json`` is laxer: no
  NaN/Infinity, no lone UTF-16 surrogates, no number beyond float64's range, at most 127
  nested containers, no duplicate ``__metadata__`` (or duplicate field inside an entry);
* ``__metadata__``, if present, is null or a map of strings to strings;
* each entry has a known ``dtype``, a ``shape`` of integers in [0, 2**64) and two such
  ``data_offsets``; like serde, an entry may also be the array ``[dtype, shape, offsets]``,
  unknown fields are ignored, and of two entries with the same name the later one counts;
* sorted by offset, the entries tile the data buffer exactly: each starts where the last
  ended (the first at 0), ``end >= begin``, ``end - begin`` is the shape's size in bytes
  (sub-byte dtypes must fill whole bytes; no 64-bit overflow), and the last ends at the end
  of the file.

Every refusal is an :class:`~dora_analysis.errors.InputError` naming the file and, where
there is one, the tensor.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from os import PathLike
from typing import Any, NamedTuple

import torch

from .errors import InputError, first_line

# The format caps the header at 100 MB; the library refuses anything larger.
MAX_HEADER_BYTES = 100_000_000

# Every dtype the format defines, with its size in *bits*: F4 and F6 pack several elements
# into a byte, so a tensor of them is valid only when it fills whole bytes.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip

# What torch calls each dtype, looked up by name so that an older torch simply lacks it.
# F4 and F6 are absent on purpose: torch has no F6, and its F4 (float4_e2m1fn_x2) packs two
# values per element, so the header's shape would not be the tensor's shape.
_TORCH_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8",
    "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16",
    "I32": "int32", "U32": "uint32", "F32": "float32", "C64": "complex64",
    "F64": "float64", "I64": "int64", "U64": "uint64",
}  # fmt: skip

_LEN_BYTES = 8
_USIZE_END = 1 << 64  # offsets and dims are Rust usize: u64 on the platforms that matter
_I64_MIN = -(1 << 63)
# serde-json refuses the 128th nested array/object, even inside fields it then ignores.
_MAX_DEPTH = 127
_FIELDS = frozenset(("dtype", "shape", "data_offsets"))
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_HINT = "the file may be truncated or corrupt; re-download or re-save it"


class TensorEntry(NamedTuple):
    """One tensor's header entry; ``begin``/``end`` are offsets into the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class Header(NamedTuple):
    """A checked header.

    Attributes:
        data_start: File offset of the data buffer (8 + header length).
        tensors: name -> entry, in file (offset) order.
        metadata: The ``__metadata__`` map, or None when absent or null.
    """

    data_start: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] | None


class _Reject(Exception):
    """A header the library would refuse; turned into an InputError naming the file."""

    def __init__(self, why: str, tensor: str | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.tensor = tensor


class _Pairs(list):
    """A JSON object as its (key, value) pairs in file order, duplicates kept."""


def parse_header(
    source: bytes | bytearray | memoryview | Callable[[int, int], bytes],
    file_size: int,
    *,
    path: str | PathLike[str],
) -> Header:
    """Read and check a safetensors header.

    Args:
        source: The file's bytes (at least its first ``8 + n``), or ``read(offset, size)``
            returning the bytes at ``offset`` (fewer at the end of the file).
        file_size: Size of the whole file in bytes.
        path: The file, for error messages.

    Returns:
        The :class:`Header`.

    Raises:
        InputError: The library would refuse the file; the message says why, in one line.

    Example:
        >>> data = open("model.safetensors", "rb").read()  # doctest: +SKIP
        >>> parse_header(data, len(data), path="model.safetensors").tensors  # doctest: +SKIP
    """
    if callable(source):
        read = source
    else:
        view = memoryview(source)

        def read(offset: int, size: int) -> bytes:
            return bytes(view[offset : offset + size])

    try:
        return _parse(read, file_size)
    except _Reject as exc:
        raise InputError(f"not a readable safetensors file: {exc.why}", path=path, tensor=exc.tensor, hint=_HINT) from None


def torch_dtype(dtype: str) -> torch.dtype | None:
    """The torch dtype a safetensors dtype reads as, or None where torch has none we can use."""
    name = _TORCH_NAMES.get(dtype)
    return None if name is None else getattr(torch, name, None)


def unreadable(dtype: str, *, path: str | PathLike[str], tensor: str) -> InputError:
    """The error for reading a tensor whose dtype the file may hold but torch cannot give us."""
    return InputError(
        f"cannot read a {dtype} tensor: torch {torch.__version__} has no matching dtype",
        path=path,
        tensor=tensor,
        hint="the file is valid; leave this tensor out of the analysis",
    )


def _parse(read: Callable[[int, int], bytes], file_size: int) -> Header:
    head = read(0, _LEN_BYTES)
    if len(head) < _LEN_BYTES:
        raise _Reject("file is shorter than a safetensors header")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise _Reject(f"header length {n} is over the format's {MAX_HEADER_BYTES}-byte cap")
    if n > file_size - _LEN_BYTES:
        raise _Reject(f"header length {n} does not fit in a {file_size}-byte file")
    raw = read(_LEN_BYTES, n)
    if len(raw) < n:
        raise _Reject(f"file ended inside the {n}-byte header (truncated?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Reject(f"header is not valid UTF-8 ({first_line(exc)})") from None
    tensors, metadata = _interpret(_load_json(text))
    data_start = _LEN_BYTES + n
    ordered = _check_layout(tensors, file_size - data_start)
    return Header(data_start, dict(ordered), metadata)


# --- JSON, read as strictly as serde-json reads it -----------------------------------------


def _json_int(text: str) -> int | float:
    """An integer literal as serde-json sees it: outside u64/i64 it is a float (or an error)."""
    value = int(text)
    if value == 0 and text.startswith("-"):
        return -0.0  # serde-json reads "-0" as the float -0.0, which no size field accepts
    if _I64_MIN <= value < _USIZE_END:
        return value
    try:
        return float(value)
    except OverflowError:
        raise ValueError("number out of range") from None


def _json_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("number out of range")
    return value


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _load_json(text: str) -> Any:
    try:
        value = json.loads(
            text,
            object_pairs_hook=_Pairs,
            parse_int=_json_int,
            parse_float=_json_float,
            parse_constant=_json_constant,
        )
    except (ValueError, RecursionError) as exc:
        raise _Reject(f"header is not valid JSON ({first_line(exc)})") from None
    # Python's json joins an escaped surrogate pair into one character and keeps a lone one;
    # with no surrogate escape in the text there is nothing to look for.
    _check_json_tree(value, strings=_SURROGATE_ESCAPE.search(text) is not None)
    return value


def _check_json_tree(value: Any, *, strings: bool) -> None:
    """Refuse what Python's json takes but serde-json does not: deep nesting, lone surrogates.

    ``strings``: look for lone surrogates too (only needed if the text escapes any surrogate).
    """
    if not isinstance(value, list):
        return  # a bare scalar: refused later, as not an object
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise _Reject(f"header is not valid JSON (nested deeper than {_MAX_DEPTH} levels)")
        for child in (item for pair in node for item in pair) if isinstance(node, _Pairs) else node:
            if isinstance(child, list):
                stack.append((child, depth + 1))
            elif strings and isinstance(child, str) and _SURROGATE.search(child):
                raise _Reject("header is not valid JSON (lone UTF-16 surrogate in a string)")


# --- The header's fields, typed the way the library's structs type them ---------------------


def _interpret(header: Any) -> tuple[dict[str, TensorEntry], dict[str, str] | None]:
    if not isinstance(header, _Pairs):
        raise _Reject(f"header is not a JSON object (got {_json_type(header)})")
    tensors: dict[str, TensorEntry] = {}
    metadata: dict[str, str] | None = None
    seen_metadata = False
    for key, value in header:
        if key == "__metadata__":
            if seen_metadata:
                raise _Reject("header has __metadata__ twice")
            seen_metadata = True
            metadata = _metadata(value)
        else:
            # A repeated name replaces the earlier entry, as in the library's map; the
            # earlier one must still be well-formed.
            tensors.pop(key, None)
            tensors[key] = _entry(key, value)
    return tensors, metadata


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, _Pairs):
        raise _Reject(f"__metadata__ is not a map of strings (got {_json_type(value)})")
    out: dict[str, str] = {}
    for key, item in value:
        if not isinstance(item, str):
            raise _Reject(f"__metadata__[{key!r}] is not a string (got {_json_type(item)})")
        out[key] = item
    return out


def _entry(name: str, value: Any) -> TensorEntry:
    if isinstance(value, _Pairs):
        fields: dict[str, Any] = {}
        for key, item in value:
            if key in _FIELDS:  # anything else is ignored, as serde ignores unknown fields
                if key in fields:
                    raise _Reject(f"entry has {key!r} twice", tensor=name)
                fields[key] = item
        try:
            dtype, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
        except KeyError as exc:
            raise _Reject(f"entry has no {exc.args[0]!r}", tensor=name) from None
    elif isinstance(value, list):
        if len(value) != len(_FIELDS):
            raise _Reject(f"entry is an array of {len(value)} items, not [dtype, shape, data_offsets]", tensor=name)
        dtype, shape, offsets = value
    else:
        raise _Reject(f"entry is {_json_type(value)}, not an object", tensor=name)
    dtype = _dtype(name, dtype)
    if not isinstance(shape, list) or isinstance(shape, _Pairs):
        raise _Reject(f"shape is {_json_type(shape)}, not an array", tensor=name)
    if not isinstance(offsets, list) or isinstance(offsets, _Pairs) or len(offsets) != 2:
        raise _Reject("data_offsets is not an array [begin, end]", tensor=name)
    for what, numbers in (("shape", shape), ("data_offsets", offsets)):
        for x in numbers:
            if type(x) is not int or not 0 <= x < _USIZE_END:
                shown = _json_type(x) if isinstance(x, (list, str)) or x is None else json.dumps(x)
                raise _Reject(f"{what} holds {shown}, not an integer in [0, 2**64)", tensor=name)
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def _dtype(name: str, value: Any) -> str:
    # serde also takes a unit enum variant written as a one-key map {"F32": null}.
    if isinstance(value, _Pairs) and len(value) == 1 and value[0][1] is None:
        value = value[0][0]
    if not isinstance(value, str) or value not in DTYPE_BITS:
        shown = value if isinstance(value, str) else _json_type(value)
        raise _Reject(f"unknown dtype {shown!r}", tensor=name)
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, _Pairs):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


# --- Where the bytes are ---------------------------------------------------------------------


def _check_layout(tensors: dict[str, TensorEntry], data_size: int) -> list[tuple[str, TensorEntry]]:
    """Sorted by offset, the entries tile ``[0, data_size)`` exactly, each its own size.

    Returns:
        The entries in offset order.
    """
    ordered = sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end))
    start = 0
    for name, (dtype, shape, begin, end) in ordered:
        if begin != start or end < begin:
            if end < begin:
                why = f"data offsets [{begin}, {end}] end before they begin"
            elif begin < start:
                why = f"data offsets [{begin}, {end}] overlap the previous tensor, which ends at {start}"
            else:
                why = f"data offsets [{begin}, {end}] leave a gap of {begin - start} bytes after the previous tensor"
            raise _Reject(why, tensor=name)
        start = end
        elements = 1
        for dim in shape:
            # Left to right, as the library multiplies: [2**32, 2**32, 0] overflows, [0, ...] does not.
            elements *= dim
            if elements >= _USIZE_END:
                raise _Reject(f"shape {list(shape)} overflows 64 bits", tensor=name)
        bits = elements * DTYPE_BITS[dtype]
        if bits >= _USIZE_END:
            raise _Reject(f"shape {list(shape)} of {dtype} overflows 64 bits", tensor=name)
        if bits % 8:
            raise _Reject(f"shape {list(shape)} of {dtype} does not fill whole bytes ({bits} bits)", tensor=name)
        if end - begin != bits // 8:
            raise _Reject(f"data offsets hold {end - begin} bytes, shape {list(shape)} of {dtype} needs {bits // 8}", tensor=name)
    if start > data_size:
        first = next(name for name, entry in ordered if entry.end > data_size)
        raise _Reject("tensor data runs past the end of the file (truncated?)", tensor=first)
    if start < data_size:
        raise _Reject(f"{data_size - start} bytes after the last tensor's data are not described by the header")
    return ordered
