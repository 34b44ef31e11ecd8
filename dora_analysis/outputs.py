"""Writing an analysis to its output folder, all or nothing: the tables, the JSON, the report.

Shared by every command that writes results (``dora-analyze --out``, ``dora-reproduce``).

The promise: after :func:`write_outputs` the folder holds either the old results or the new
ones, never a mix and never a half-written file, whatever happens (an error, a full disk,
Ctrl-C, SIGTERM), and no staging folder is left behind. How:

1. :func:`check_out` refuses a destination that cannot work (a file, a parent that is a file,
   a read-only place, a name too long) before anything is computed.
2. Everything is written to a staging folder on the destination's own file system: a hidden
   sibling of the (symlink-resolved) destination, or, when the destination is a mount point,
   its parent is not writable or it holds the current directory, a hidden folder inside it.
3. The switch: entries of the old folder that this module did not write (``.cache``,
   ``runs/``, a user's notes) are moved into the staging folder, then the two folders trade
   places in one ``renameat2(RENAME_EXCHANGE)``, atomic even for a reader watching the
   folder. Where the kernel or file system lacks it, two renames do it; inside a mount
   point, each output entry is swapped with the old one kept aside until all are in. Any
   failure puts everything back. Stop signals are held back during the switch and the
   clean-up (:func:`dora_analysis.console.deferred_signals`).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .console import deferred_signals
from .errors import InputError, first_line

if TYPE_CHECKING:
    import pandas as pd

# Every name this module writes (the report adds report.md, report.html and figures/). Only
# these are replaced; anything else in the folder is kept as it is.
OUTPUT_NAMES = frozenset({"layers.csv", "summary.csv", "summary.json", "pairs.csv", "spectra.csv", "report.md", "report.html", "figures"})

_STAGING = "staging"


def check_out(out: str | os.PathLike[str]) -> Path:
    """Check that ``out`` can become an output folder, before any work; return it.

    Refused with one line naming the path: an existing file (or anything not a folder), a
    broken symlink, a parent that is a file, a name longer than the file system allows, a
    place that cannot be written (read-only, no permission). Nothing is left behind: the
    write test creates and removes a hidden folder.

    Raises:
        InputError: ``out`` cannot be written.
    """
    out = Path(out)
    _check_length(out)
    if out.is_symlink() and not out.exists():
        raise InputError("--out is a broken symlink", path=out, hint="remove it or point it at a folder")
    if out.exists() and not out.is_dir():
        raise InputError("--out exists and is not a folder", path=out, hint="choose a folder path (it is created if missing)")
    ancestor = out
    while not ancestor.exists():
        if ancestor.is_symlink():
            raise InputError("--out goes through a broken symlink", path=ancestor)
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError("--out cannot be created: its parent is a file, not a folder", path=ancestor)
    _probe(out.resolve() if out.exists() else ancestor, out)
    return out


def _check_length(path: Path) -> None:
    """File systems refuse components over NAME_MAX bytes and paths over PATH_MAX: say so first."""
    probe = next((p for p in (path, *path.parents) if _lexists(p)), Path("."))
    try:
        name_max = os.pathconf(probe, "PC_NAME_MAX")
        path_max = os.pathconf(probe, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            raise InputError(f"a name in the path is longer than the file system allows ({name_max} bytes)", path=part[:60] + "...")
    if len(os.fsencode(str(path.absolute()))) >= path_max:
        raise InputError(f"path longer than the file system allows ({path_max} bytes)", path=str(path)[:80] + "...")


def _lexists(path: Path) -> bool:
    try:
        os.lstat(path)
    except (OSError, ValueError):
        return False
    return True


def _probe(where: Path, out: Path) -> None:
    """Create and remove a hidden folder in ``where``: the one sure test of writability."""
    try:
        with deferred_signals():
            os.rmdir(tempfile.mkdtemp(prefix=f".{out.name or 'out'}.probe-", dir=where))
    except OSError as exc:
        raise InputError(f"--out cannot be written ({exc.strerror or first_line(exc)})", path=where) from None


def write_outputs(
    out: str | os.PathLike[str],
    layers: pd.DataFrame,
    summary: pd.DataFrame,
    *,
    fmt: str = "png",
    plots: bool = True,
    paper: dict[str, float] | None = None,
    title: str | None = None,
) -> list[Path]:
    """Write every output into ``out``, all or nothing.

    Files: ``layers.csv``, ``summary.csv``, ``summary.json``, and the report
    (:func:`dora_analysis.report.write_report`: ``report.md``, ``report.html``, ``figures/``).
    They replace the previous outputs in ``out`` as one switch (see the module docstring);
    entries of ``out`` with other names (``.cache``, ``runs/``) are kept. May be called again
    on the same folder (after each new checkpoint, say): each call is one switch.

    Returns:
        The files written, under ``out``.

    Raises:
        InputError: ``out`` cannot be written (checked before anything is drawn).
    """
    out = check_out(out)
    dest = out.resolve() if out.is_symlink() else out.absolute()
    # The folder itself cannot trade places when it is a mount point, its parent is read-only,
    # or a shell may be standing in it (the current directory or below): swap entries instead.
    inside = dest.is_dir() and (os.path.ismount(dest) or not _writable(dest.parent) or _holds_cwd(dest))
    home = dest if inside else dest.parent
    home.mkdir(parents=True, exist_ok=True)
    with deferred_signals():
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{_STAGING}-", dir=home))
    try:
        _write_all(staging, layers, summary, fmt=fmt, plots=plots, paper=paper, title=title)
        names = sorted(p.name for p in staging.iterdir())
        with deferred_signals():
            if inside:
                _swap_entries(staging, dest)
            else:
                _switch_folder(staging, dest)
    finally:
        with deferred_signals():
            shutil.rmtree(staging, ignore_errors=True)
    written: list[Path] = []
    for name in names:
        target = out / name
        written.extend([target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file()))
    return written


def _write_all(staging: Path, layers: pd.DataFrame, summary: pd.DataFrame, **report: object) -> None:
    from .analysis import subspace_pairs, update_spectra
    from .report import write_report

    layers.to_csv(staging / "layers.csv", index=False)
    summary.to_csv(staging / "summary.csv", index=False)
    # The subspace similarity between tuned versions and the top singular values of each
    # update, when the walk computed them (spectrum metric).
    for name, frame in (("pairs.csv", subspace_pairs(layers)), ("spectra.csv", update_spectra(layers))):
        if len(frame):
            frame.to_csv(staging / name, index=False)
    records = json.loads(summary.to_json(orient="records"))
    (staging / "summary.json").write_text(json.dumps({"runs": records}, indent=2) + "\n")
    write_report(staging, layers, summary, **report)  # type: ignore[arg-type]


def _holds_cwd(folder: Path) -> bool:
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        return False
    return cwd == folder.resolve() or folder.resolve() in cwd.parents


def _writable(folder: Path) -> bool:
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=folder))
        return True
    except OSError:
        return False


def _switch_folder(staging: Path, dest: Path) -> None:
    """Make ``staging`` the folder at ``dest`` in one step; the old one ends up at ``staging``.

    Entries of the old folder that are not outputs move over first, and back on failure.
    """
    if not dest.exists():
        os.chmod(staging, 0o777 & ~_umask())
        os.rename(staging, dest)
        return
    os.chmod(staging, dest.stat().st_mode & 0o7777)
    moved: list[str] = []
    try:
        for entry in sorted(os.listdir(dest)):
            if entry not in OUTPUT_NAMES and not (staging / entry).exists():
                os.rename(dest / entry, staging / entry)
                moved.append(entry)
        _exchange(staging, dest)
    except BaseException:
        for entry in reversed(moved):
            os.rename(staging / entry, dest / entry)
        raise


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders: ``renameat2(RENAME_EXCHANGE)``, else two renames with a rollback."""
    if _renameat2_exchange(a, b):
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{b.name}.{_STAGING}-old-", dir=b.parent))
    os.rmdir(aside)
    os.rename(b, aside)
    try:
        os.rename(a, b)
    except BaseException:
        os.rename(aside, b)
        raise
    os.rename(aside, a)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """True if the kernel swapped ``a`` and ``b`` atomically; False where it cannot (other OS, old kernel, file system)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_entries(staging: Path, dest: Path) -> None:
    """Inside a folder that cannot itself be renamed: swap entry by entry, the old ones kept aside until all are in."""
    aside = Path(tempfile.mkdtemp(prefix=f".{_STAGING}-old-", dir=dest))
    old = [e for e in os.listdir(dest) if e in OUTPUT_NAMES or (staging / e).exists()]
    old = [e for e in old if not e.startswith(".") or e in OUTPUT_NAMES]
    moved_old: list[str] = []
    moved_new: list[str] = []
    try:
        for entry in old:
            os.rename(dest / entry, aside / entry)
            moved_old.append(entry)
        for entry in sorted(os.listdir(staging)):
            os.rename(staging / entry, dest / entry)
            moved_new.append(entry)
    except BaseException:
        for entry in reversed(moved_new):
            os.rename(dest / entry, staging / entry)
        for entry in reversed(moved_old):
            os.rename(aside / entry, dest / entry)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
