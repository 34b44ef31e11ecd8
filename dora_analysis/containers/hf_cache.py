"""The Hugging Face cache: a hub id (``ORG/NAME[@REVISION]``) or a ``models--ORG--NAME`` folder, offline.

The cache is ``huggingface_hub``'s: under ``HF_HUB_CACHE`` (default ``$HF_HOME/hub``, and
``HF_HOME`` defaults to ``~/.cache/huggingface``) each model is a folder
``models--ORG--NAME/`` with ``blobs/<hash>`` (the bytes), ``snapshots/<commit>/`` (the files,
as symlinks into ``blobs``) and ``refs/<branch>`` (a commit hash). Resolution is
``huggingface_hub.snapshot_download(..., local_files_only=True)``: the library's own reading
of its layout, and it never downloads. A model that is not in the cache is an error that
names the id and the folder looked in.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import InputError, first_line

# ORG/NAME[@REVISION], as the Hub spells repository ids (no leading `/` or `.`, one `/`).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
_REPO_FOLDER = re.compile(r"^models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")


def hub_cache_dir() -> Path:
    """Where ``huggingface_hub`` keeps models: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``.

    Read from the environment at each call (``huggingface_hub.constants`` reads it once, at
    import), so a cache set after import is still the one used.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` if ``text`` reads as a hub id ``ORG/NAME[@REVISION]``, else None."""
    m = _HUB_ID.match(text)
    return (m.group("repo"), m.group("revision")) if m else None


def resolve_hub_id(text: str, cache_dir: Path | None = None) -> Path:
    """The local snapshot folder of hub id ``ORG/NAME[@REVISION]``, from the cache only.

    Args:
        text: ``ORG/NAME``, or ``ORG/NAME@REVISION`` (a branch, tag or commit hash; default
            ``main``).
        cache_dir: The hub cache (default :func:`hub_cache_dir`).

    Raises:
        InputError: Not a hub id, or not in the cache (the message names the id and where it
            looked).
    """
    parsed = parse_hub_id(text)
    if parsed is None:
        raise InputError("not a Hugging Face hub id (expected ORG/NAME[@REVISION])", path=text)
    repo_id, revision = parsed
    cache = cache_dir or hub_cache_dir()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        found = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as exc:
        folder = cache / ("models--" + repo_id.replace("/", "--"))
        what = f"{repo_id}@{revision}" if revision else repo_id
        raise InputError(
            f"no local path {text!r}, and hub id {what} is not in the Hugging Face cache (looked in {folder})",
            hint="download it first (`hf download " + repo_id + "`), set HF_HUB_CACHE / HF_HOME to the cache that holds it, "
            "or give a local path",
        ) from exc
    return Path(found)


def is_cache_repo_folder(path: Path) -> bool:
    """A ``models--ORG--NAME`` folder of the hub cache (with ``snapshots/``)."""
    return path.is_dir() and _REPO_FOLDER.match(path.name) is not None and (path / "snapshots").is_dir()


def snapshot_of_repo_folder(path: Path) -> Path:
    """The snapshot ``refs/main`` names in a ``models--ORG--NAME`` folder (via ``huggingface_hub``).

    Raises:
        InputError: No ``refs/main`` and not exactly one snapshot to fall back on.
    """
    m = _REPO_FOLDER.match(path.name)
    assert m is not None  # claimed
    try:
        return resolve_hub_id(f"{m.group('org')}/{m.group('name')}", cache_dir=path.parent)
    except InputError as exc:
        snapshots = sorted(p for p in (path / "snapshots").iterdir() if p.is_dir())
        if len(snapshots) == 1:
            return snapshots[0]  # no refs/main (a cache copied without refs): the only snapshot
        raise InputError(
            f"cannot tell which snapshot to read ({first_line(exc)})",
            path=path,
            hint="give the snapshots/<commit> folder, or ORG/NAME@REVISION",
        ) from exc
