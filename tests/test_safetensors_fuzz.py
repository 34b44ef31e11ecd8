"""The safetensors header parser against the safetensors library, on generated files.

The oracle is the library itself: ``safetensors.safe_open(path, "pt")``. Generated files are
valid ones built from random tensors, then zero to two mutations (bad, overlapping or gapped
offsets, wrong sizes, unknown or map-form dtypes, fields of the wrong type, missing or doubled
fields, entries as arrays, doubled tensors, metadata of every wrong type, NaN / -0 / huge
numbers / deep nesting / lone surrogates where serde-json and Python's json differ, bad JSON,
wrong header lengths, truncation and trailing bytes).

Both directions are held: :func:`parse_header` accepts a file exactly when the library opens
it, and when both accept they agree on every tensor's name, dtype and shape, and on the
metadata. A few explicit cases follow the generated ones.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dora_analysis.containers import open_checkpoint
from dora_analysis.errors import InputError
from dora_analysis.safetensors_format import DTYPE_BITS, MAX_HEADER_BYTES, parse_header, torch_dtype

# Bounded for CI (about 1,000 files in all, ~10 s on one slow core); derandomize: the same
# files on every run.
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


# --- A JSON writer that can say what json.dumps cannot: repeated keys and raw tokens --------


@dataclass
class Obj:
    """A JSON object as pairs, so a key may repeat."""

    pairs: list[tuple[str, Any]]


@dataclass
class Raw:
    """A token written as is: ``NaN``, ``-0``, ``1e400``, ``"\\ud800"``."""

    text: str


def dump(value: Any) -> str:
    if isinstance(value, Obj):
        return "{" + ", ".join(f"{json.dumps(k)}: {dump(v)}" for k, v in value.pairs) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dump(v) for v in value) + "]"
    if isinstance(value, Raw):
        return value.text
    return json.dumps(value)


def nested(depth: int) -> Raw:
    return Raw("[" * depth + "]" * depth)


# Values that are wrong for a dtype, a shape, a dim or an offset, and the serde-json / Python
# json disagreements: each is accepted by one reader of JSON and refused by the other.
WRONG = [
    None, True, "2", 1.0, -1, 2**64, 2**64 - 1, [], [[1]], Obj([]), Raw("-0"), Raw("2e0"),
    Raw("NaN"), Raw("Infinity"), Raw("1e400"), Raw("1" + "0" * 400), Raw('"\\ud800"'),
]  # fmt: skip

# Values for a field the library ignores, which serde-json must still be able to read: one
# list per way the two JSON readers can disagree. An entry's fields sit 3 levels deep, so
# nested(124) reaches 127 levels, the deepest serde-json takes.
IGNORED = {
    "odd number": [Raw(t) for t in (
        "-0", "0e999", "1e-400", "1e308", "1.7976931348623157e308", "1.8e308", "-1e400",
        "18446744073709551616", "-9223372036854775809", "1" + "0" * 308, "1" + "0" * 309, "-1" + "0" * 400,
        "NaN", "Infinity", "-Infinity",
    )],
    "odd string": [Raw(t) for t in ('"\\ud800"', '"\\udc00x"', '"a\\ud800"', '"\\ud83d\\ude00"', '"\\u00e9"', '"\\/"')] + ["x", ""],
    "deep value": [nested(d) for d in range(120, 129)] + [Obj([("a", Obj([("a", nested(122))]))]), Obj([("a", 1), ("a", 2)]), None],
}  # fmt: skip
BAD_DTYPES = ["f32", "F8", "", "FLOAT32", "F32 ", "float32", "Q4"]
METADATA = [
    None, Obj([]), Obj([("a", "b")]), Obj([("a", "1"), ("a", "2")]), Obj([("a", 1)]),
    Obj([("a", None)]), Obj([("a", Obj([]))]), [], "x", 1, Obj([("\ud83d\ude00", "")]),
]  # fmt: skip


# --- Files ----------------------------------------------------------------------------------


@dataclass
class Draft:
    """A file before it is written: the header object's pairs and the data buffer's size."""

    pairs: list[list[Any]]  # [key, value], so mutations can edit in place
    data_size: int


# Shapes where the library's left-to-right, overflow-checked product matters: the product
# passes 2**64 before a later 0 (refused) or after an earlier 0 (accepted), or a dim is 2**64.
EDGE_SHAPES = [[0, 2**32, 2**32], [2**32, 2**32, 0], [0, 2**64 - 1], [2**64 - 1, 0], [0, 2**64], [2**62, 4, 0]]
SUB_BYTE = ["F4", "F6_E2M3", "F6_E3M2"]


@st.composite
def drafts(
    draw: st.DrawFn, *, dtypes: list[str] | None = None, edge: bool = False, whole_bytes: bool = True, min_tensors: int = 0
) -> Draft:
    """Random tensors laid out back to back, each with exactly its size in bytes.

    Args:
        dtypes: Draw dtypes from these (default: all the format's).
        edge: One tensor's shape is one of :data:`EDGE_SHAPES`.
        whole_bytes: Grow F4/F6 shapes until they fill whole bytes; if False the size is
            rounded down, so that is the file's only fault.
        min_tensors: At least this many tensors.
    """
    names = draw(st.lists(st.text("ab._0", min_size=1, max_size=4), min_size=min_tensors, max_size=4, unique=True))
    odd_one = draw(st.sampled_from(names)) if edge and names else None
    entries = {}
    for name in names:
        dtype = draw(st.sampled_from(dtypes or sorted(DTYPE_BITS)))
        if name == odd_one:
            shape = list(draw(st.sampled_from(EDGE_SHAPES)))
        else:
            shape = draw(st.lists(st.integers(0, 5), max_size=3))
            while whole_bytes and math.prod(shape) * DTYPE_BITS[dtype] % 8:
                shape.append(2)
        entries[name] = (dtype, shape, math.prod(shape) * DTYPE_BITS[dtype] // 8)
    offset, pairs = 0, []
    for name in draw(st.permutations(names)):  # data order differs from header order
        dtype, shape, size = entries[name]
        pairs.append([name, Obj([["dtype", dtype], ["shape", shape], ["data_offsets", [offset, offset + size]]])])
        offset += size
    pairs = draw(st.permutations(pairs))
    if draw(st.booleans()):
        meta = draw(
            st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2).map(lambda d: Obj(list(d.items()))))
        )
        pairs.insert(draw(st.integers(0, len(pairs))), ["__metadata__", meta])
    return Draft(list(pairs), offset)


def _entries(draft: Draft) -> list[Obj]:
    return [v for k, v in draft.pairs if k != "__metadata__" and isinstance(v, Obj)]


def _field(entry: Obj, key: str) -> list[Any] | None:
    """The entry's first ``[key, value]`` pair, or None."""
    return next((p for p in entry.pairs if p[0] == key), None)


def _ints(field: list[Any] | None) -> list[int] | None:
    """The field's value while it is still a list of integers (earlier mutations may differ)."""
    value = None if field is None else field[1]
    ok = isinstance(value, list) and not isinstance(value, Obj) and all(type(x) is int for x in value)
    return value if ok else None


def _respell(draw: st.DrawFn, entry: Obj) -> None:
    """Write a field's value another way: the same to Python's json, not always to serde-json."""
    numbers = [v for f in ("shape", "data_offsets") if (v := _ints(_field(entry, f))) and v]
    dtype = _field(entry, "dtype")
    if numbers and draw(st.booleans()):
        # Zeros first when there are any: "-0" is the respelling the two readers disagree on.
        places = [(v, i) for v in numbers for i in range(len(v))]
        zeros = [(v, i) for v, i in places if v[i] == 0]
        values, i = draw(st.sampled_from(zeros if zeros and draw(st.integers(0, 3)) else places))
        x = values[i]
        values[i] = Raw(draw(st.sampled_from(["-0"] * 3 if x == 0 else [str(x)]) | st.sampled_from([f"{x}.0", f"{x}e0", f"{x}E+0"])))
    elif dtype and isinstance(dtype[1], str):
        name = dtype[1]
        escaped = Raw('"' + "".join(f"\\u{ord(c):04x}" for c in name) + '"')
        dtype[1] = draw(st.sampled_from([Obj([(name, None)]), Obj([(name, [])]), Obj([(name, None), (name, None)]), escaped, name.lower()]))


MUTATIONS = [
    "data size", "shift tensor", "offset", "swap offsets", "shape", "dtype", "respell",
    "wrong type", "drop field", "double field", *IGNORED, "as array", "not an object",
    "double tensor", "metadata", "double metadata",
]  # fmt: skip


def mutate(draw: st.DrawFn, draft: Draft, kind: str) -> None:
    """Apply one header-level mutation in place: each aims at one rule, leaving the rest valid."""
    entries = _entries(draft)
    if kind == "metadata":
        meta = [p for p in draft.pairs if p[0] == "__metadata__"]
        value = draw(st.sampled_from(METADATA))
        if meta:
            meta[0][1] = value
        else:
            draft.pairs.insert(draw(st.integers(0, len(draft.pairs))), ["__metadata__", value])
    elif kind == "double metadata":
        draft.pairs += [["__metadata__", Obj([])], ["__metadata__", Obj([])]]
    elif kind == "data size":
        draft.data_size = max(0, draft.data_size + draw(st.sampled_from([-3, -1, 1, 2])))
    elif not entries:
        draft.pairs.append([draw(st.sampled_from(["t", "u"])), draw(st.sampled_from(WRONG))])
    elif kind == "shift tensor" and (offsets := _ints(_field(draw(st.sampled_from(entries)), "data_offsets"))):
        # Both ends move: the size still matches, so only a gap or an overlap is wrong.
        k = draw(st.sampled_from([-2, -1, 1, 2]))
        offsets[:] = [max(0, x + k) for x in offsets]
        draft.data_size = max(draft.data_size, max(offsets, default=0))
    elif kind == "swap offsets":
        a, b = draw(st.sampled_from(entries)), draw(st.sampled_from(entries))
        fa, fb = _field(a, "data_offsets"), _field(b, "data_offsets")
        if fa and fb:
            fa[1], fb[1] = fb[1], fa[1]
    else:
        entry = draw(st.sampled_from(entries))
        field = _field(entry, draw(st.sampled_from(["dtype", "shape", "data_offsets"])))
        if kind == "offset" and (offsets := _ints(_field(entry, "data_offsets"))):
            # One end moves: a wrong size, a reversed pair, or a gap or overlap as well.
            i = draw(st.integers(0, len(offsets) - 1))
            offsets[i] = max(0, offsets[i] + draw(st.sampled_from([-8, -2, -1, 1, 2, 8])))
        elif kind == "shape" and (shape := _field(entry, "shape")):
            shape[1] = draw(st.one_of(st.lists(st.integers(0, 5), max_size=4), st.sampled_from(EDGE_SHAPES)))
        elif kind == "dtype" and (dtype := _field(entry, "dtype")):
            dtype[1] = draw(st.sampled_from(sorted(DTYPE_BITS) + BAD_DTYPES))
        elif kind == "respell":
            _respell(draw, entry)
        elif kind == "wrong type" and field:
            if isinstance(field[1], list) and not isinstance(field[1], Obj) and field[1] and draw(st.booleans()):
                field[1][draw(st.integers(0, len(field[1]) - 1))] = draw(st.sampled_from(WRONG))
            else:
                field[1] = draw(st.sampled_from(WRONG))
        elif kind == "drop field" and field:
            entry.pairs.remove(field)
        elif kind == "double field" and field:
            entry.pairs.insert(draw(st.integers(0, len(entry.pairs))), list(field))
        elif kind in IGNORED:
            key = draw(st.sampled_from(["x", "x", "x", "__metadata__"] + (["\ud800", "\ud83d\ude00"] if kind == "odd string" else [])))
            entry.pairs.insert(draw(st.integers(0, len(entry.pairs))), [key, draw(st.sampled_from(IGNORED[kind]))])
        elif kind == "as array":
            values = [f[1] for f in (_field(entry, k) for k in ("dtype", "shape", "data_offsets")) if f]
            values = [*values, 0][: draw(st.sampled_from([3, 3, 2, 4]))]
            draft.pairs = [[k, values if v is entry else v] for k, v in draft.pairs]
        elif kind == "not an object":
            draft.pairs = [[k, draw(st.sampled_from(WRONG)) if v is entry else v] for k, v in draft.pairs]
        elif kind == "double tensor":
            # The later of two same-named entries counts; the earlier must still be well-formed.
            name = next(k for k, v in draft.pairs if v is entry)
            copy = Obj([[k, list(v) if isinstance(v, list) and not isinstance(v, Obj) else v] for k, v in entry.pairs])
            if draw(st.integers(0, 3)):
                mutate(
                    draw,
                    Draft([[name, copy]], draft.data_size),
                    draw(st.sampled_from(["offset", "shift tensor", "shape", "dtype", "wrong type"])),
                )
            draft.pairs.insert(draw(st.integers(0, len(draft.pairs))), [name, copy])


DAMAGE = ["length", "huge length", "truncate", "stray byte", "top level", "cut json"]


def to_bytes(draw: st.DrawFn, draft: Draft, damage: str = "none") -> bytes:
    """Serialize, then damage the bytes as asked: header length, truncation, a stray byte..."""
    text = dump(Obj([tuple(p) for p in draft.pairs]))
    if draw(st.booleans()):
        text += " " * (-len(text) % 8)  # the library pads its headers to 8 bytes with spaces
    header = text.encode("utf-8", "surrogatepass")
    data = bytes(draft.data_size)
    n = len(header)
    if damage == "length":
        n = max(0, n + draw(st.sampled_from([-3, -1, 1, 2, 8])))
    elif damage == "huge length":
        n = draw(st.sampled_from([MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1, 2**63, 2**64 - 1]))
    elif damage == "stray byte":
        i = draw(st.integers(0, max(0, len(header) - 1)))
        header = header[:i] + draw(st.sampled_from([b"\x00", b"\xff", b"{", b"]", b",", b'"', b"\\", b"\x0b", b"\xc3"])) + header[i + 1 :]
    elif damage == "top level":
        header = draw(st.sampled_from([b"[]", b"1", b'"x"', b"null", b"", b"\xef\xbb\xbf{}", b"{} x"]))
        n = len(header)
    elif damage == "cut json":
        header = header[: draw(st.integers(0, max(0, len(header) - 1)))]
        n = len(header)
    blob = struct.pack("<Q", n) + header + data
    if damage == "truncate":
        blob = blob[: draw(st.integers(0, len(blob)))]
    return blob


# One rule at a time, each with its own budget of examples, then all of them mixed.
KINDS = [*MUTATIONS, "sub-byte sizes", "edge shapes", *DAMAGE]


@st.composite
def files(draw: st.DrawFn, kind: str | None = None) -> bytes:
    """A file with one fault of ``kind`` (which may cancel out), or with 0-2 mixed ones."""
    if kind == "sub-byte sizes":
        return to_bytes(draw, draw(drafts(dtypes=SUB_BYTE, whole_bytes=False, min_tensors=1)))
    if kind == "edge shapes":
        return to_bytes(draw, draw(drafts(edge=True, min_tensors=1)))
    if kind in DAMAGE:
        return to_bytes(draw, draw(drafts()), kind)
    draft = draw(drafts(edge=kind is None and draw(st.booleans()), min_tensors=1 if kind else 0))
    for mutation in [kind] if kind else draw(st.lists(st.sampled_from(MUTATIONS), max_size=2)):
        mutate(draw, draft, mutation)
    damage = draw(st.sampled_from(["none"] * 3 + DAMAGE)) if kind is None else "none"
    return to_bytes(draw, draft, damage)


def library_view(path: Path) -> dict[str, Any] | None:
    """What ``safe_open`` sees in the file, or None if it refuses it."""
    try:
        with safe_open(path, "pt") as f:
            tensors = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
            return {"tensors": tensors, "metadata": f.metadata()}
    except SafetensorError:
        return None


def our_view(blob: bytes, path: Path) -> dict[str, Any] | None:
    try:
        header = parse_header(blob, len(blob), path=path)
    except InputError as exc:
        assert "\n" not in str(exc) and path.name in str(exc)
        return None
    return {"tensors": {k: (e.dtype, e.shape) for k, e in header.tensors.items()}, "metadata": header.metadata}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "f.safetensors"


@pytest.mark.parametrize("kind", KINDS)
@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_each_fault_is_judged_as_the_library_judges_it(scratch: Path, kind: str, data: st.DataObject) -> None:
    blob = data.draw(files(kind))
    scratch.write_bytes(blob)
    assert our_view(blob, scratch) == library_view(scratch)


@settings(FUZZ, max_examples=200)
@given(blob=files())
def test_mixed_faults_are_judged_as_the_library_judges_them(scratch: Path, blob: bytes) -> None:
    scratch.write_bytes(blob)
    assert our_view(blob, scratch) == library_view(scratch)


@settings(FUZZ, max_examples=100)
@given(draft=drafts())
def test_valid_files_are_accepted(scratch: Path, draft: Draft) -> None:
    # The generator's unmutated files, on their own: the accepting side is covered as well.
    blob = _file(dump(Obj([tuple(p) for p in draft.pairs])), bytes(draft.data_size))
    scratch.write_bytes(blob)
    view = library_view(scratch)
    assert view is not None and our_view(blob, scratch) == view


# --- Explicit cases -------------------------------------------------------------------------


def _file(header: str | bytes, data: bytes = b"", *, n: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else header.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> str:
    return json.dumps({"dtype": dtype, "shape": shape, "data_offsets": [begin, end]})


CASES = [
    # (why, file, accepted, message the refusal must contain)
    ("empty header", _file("{}"), True, None),
    ("shorter than the length field", b"\x02\x00\x00", False, "shorter than a safetensors header"),
    ("header over the 100 MB cap", _file("{}", n=MAX_HEADER_BYTES + 1), False, "cap"),
    ("header length past the end", _file("{}", n=40), False, "does not fit"),
    ("not JSON", _file("{bad"), False, "not valid JSON"),
    ("not UTF-8", _file(b'{"\xff": 1}'), False, "not valid UTF-8"),
    ("not an object", _file("[]"), False, "not a JSON object"),
    ("NaN, which Python's json takes", _file('{"t": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0], "x": NaN}}'), False, "NaN"),
    (
        "128 levels deep",
        _file('{"t": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0], "x": ' + "[" * 126 + "]" * 126 + "}}"),
        False,
        "nested deeper",
    ),
    (
        "127 levels deep",
        _file('{"t": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0], "x": ' + "[" * 125 + "]" * 125 + "}}"),
        True,
        None,
    ),
    ("gap", _file('{"a": ' + _entry("U8", [1], 1, 2) + "}", b"\0\0"), False, "gap of 1 bytes"),
    ("overlap", _file('{"a": ' + _entry("U8", [2], 0, 2) + ', "b": ' + _entry("U8", [2], 1, 3) + "}", b"\0" * 3), False, "overlap"),
    ("size does not match shape", _file('{"a": ' + _entry("F32", [2], 0, 4) + "}", b"\0" * 4), False, "needs 8"),
    ("trailing bytes", _file('{"a": ' + _entry("U8", [2], 0, 2) + "}", b"\0" * 3), False, "1 bytes after the last tensor"),
    ("F4 filling half a byte", _file('{"a": ' + _entry("F4", [3], 0, 2) + "}", b"\0\0"), False, "whole bytes"),
    ("F6_E3M2, 4 values in 3 bytes", _file('{"a": ' + _entry("F6_E3M2", [4], 0, 3) + "}", b"\0" * 3), True, None),
    ("metadata value not a string", _file('{"__metadata__": {"a": 1}}'), False, "__metadata__['a'] is not a string"),
    ("metadata null", _file('{"__metadata__": null}'), True, None),
    ("dims overflow 64 bits", _file('{"a": ' + _entry("U8", [2**32, 2**32, 0], 0, 0) + "}"), False, "overflows 64 bits"),
    ("zero first, no overflow", _file('{"a": ' + _entry("U8", [0, 2**32, 2**32], 0, 0) + "}"), True, None),
]


@pytest.mark.parametrize("why, blob, accepted, message", CASES, ids=[c[0] for c in CASES])
def test_explicit_cases(tmp_path: Path, why: str, blob: bytes, accepted: bool, message: str | None) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(blob)
    assert (library_view(path) is not None) == accepted, "the case's expectation is wrong about the library"
    if accepted:
        assert our_view(blob, path) == library_view(path)
    else:
        with pytest.raises(InputError, match=re.escape(message)) as info:
            parse_header(blob, len(blob), path=path)
        assert str(info.value).startswith(f"{path}") and "\n" not in str(info.value)


def test_dtype_list_is_the_librarys(tmp_path: Path) -> None:
    # The library names every dtype it knows when it meets one it does not.
    path = tmp_path / "w.safetensors"
    path.write_bytes(_file('{"a": ' + _entry("NOPE", [0], 0, 0) + "}"))
    with pytest.raises(SafetensorError) as info:
        safe_open(path, "pt")
    assert set(re.findall(r"`(\w+)`", str(info.value).split("expected one of")[1])) == set(DTYPE_BITS)


# --- Reading through the store --------------------------------------------------------------

TORCH_DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
    torch.float32, torch.float64, torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2,
    *(getattr(torch, n) for n in ("uint16", "uint32", "uint64", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)),
]  # fmt: skip


def test_store_reads_every_dtype_as_the_library_does(tmp_path: Path) -> None:
    tensors = {
        str(dt): (torch.randn(2, 3) * 4).to(dt) if dt.is_floating_point or dt.is_complex else torch.randint(0, 100, (2, 3)).to(dt)
        for dt in TORCH_DTYPES
    }
    tensors["empty"] = torch.zeros(0, 3)
    path = tmp_path / "w.safetensors"
    save_file(tensors, path)
    store, expected = open_checkpoint(path), load_file(path)
    assert sorted(store.keys()) == sorted(expected)
    for name, want in expected.items():
        got = store.get(name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if got.numel():  # compared as bytes: torch.equal has no float8 kernel
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name


@pytest.mark.parametrize("dtype, shape, nbytes", [("F4", [2, 4], 4), ("F6_E2M3", [4], 3), ("F6_E3M2", [8], 6)])
def test_unreadable_dtypes_open_but_refuse_to_be_read(tmp_path: Path, dtype: str, shape: list[int], nbytes: int) -> None:
    header = {
        "odd": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]},
        "w": {"dtype": "F32", "shape": [2], "data_offsets": [nbytes, nbytes + 8]},
    }
    path = tmp_path / "w.safetensors"
    path.write_bytes(_file(json.dumps(header), bytes(nbytes) + struct.pack("<2f", 1.0, 2.0)))
    assert torch_dtype(dtype) is None
    store = open_checkpoint(path)
    assert store.shape("odd") == tuple(shape)
    assert store.get("w").tolist() == [1.0, 2.0]  # the rest of the file stays readable
    with pytest.raises(InputError, match=rf"w\.safetensors \[odd\]: cannot read a {dtype} tensor"):
        store.get("odd")


def test_store_refuses_what_the_library_refuses(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(_file('{"a": ' + _entry("U8", [2], 0, 2) + ', "b": ' + _entry("U8", [2], 1, 3) + "}", b"\0" * 3))
    with pytest.raises(InputError, match=r"w\.safetensors \[b\]: not a readable safetensors file: .*overlap"):
        open_checkpoint(path)
