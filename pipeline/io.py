"""Atomic file output: a crash never leaves a partial file where a good result used to be, and
a stage's outputs are replaced together (`replaced_together`), never some old and some new.
Unreadable inputs are reported in one line naming the file (`CorruptFile`)."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import CorruptFile, NotWritable

# (temporary, final) pairs of the innermost `replaced_together` block, renamed when it ends.
_deferred: list[list[tuple[str, Path]]] = []
# Checks that must pass before any output is renamed into place (`checked_before_writing`).
_checks: list[Callable[[], None]] = []


@contextmanager
def checked_before_writing(check: Callable[[], None]) -> Iterator[None]:
    """In the block, `check()` runs before every output is renamed into place; when it raises,
    that output (or the whole `replaced_together` group) is discarded and the old one stays."""
    _checks.append(check)
    try:
        yield
    finally:
        _checks.remove(check)


def _run_checks() -> None:
    for check in list(_checks):
        check()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path`; renamed over it only if the block finishes (inside
    `replaced_together`: only when that block finishes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; outputs are ordinary files
    deferred = False
    try:
        yield Path(tmp)
        if _deferred:
            _deferred[-1].append((tmp, path))
            deferred = True
        else:
            _run_checks()
            os.replace(tmp, path)
    finally:
        if not deferred and os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def replaced_together() -> Iterator[None]:
    """Every file written with `atomic_path` in the block goes to a temporary, and all are
    renamed over the old files only when the block finishes: a failure (full disk, Ctrl-C)
    leaves the previous outputs whole, never a mix of old and new files."""
    pending: list[tuple[str, Path]] = []
    _deferred.append(pending)
    done = False
    try:
        yield
        done = True
    finally:
        _deferred.pop()
        if not done:
            for tmp, _ in pending:
                Path(tmp).unlink(missing_ok=True)
    if _deferred:  # nested: the outer block renames
        _deferred[-1].extend(pending)
        return
    try:
        _run_checks()
    except BaseException:
        for tmp, _ in pending:
            Path(tmp).unlink(missing_ok=True)
        raise
    for tmp, path in pending:  # renames within a folder do not fail for want of space
        os.replace(tmp, path)


def check_writable(folders: Iterable[str | Path]) -> None:
    """Create each output folder and a file in it, so an unwritable or missing place fails in
    one line before the work starts instead of after it."""
    for folder in map(Path, folders):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            raise NotWritable(f"{folder}/: cannot write there ({exc.strerror or exc})") from None


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def save_arrays(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz whose bytes depend only on the arrays (fixed zip timestamps), so DVC sees an
    unchanged output when a stage re-runs on the same data; torch.save embeds a random id."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        for name, array in arrays.items():
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(entry, "w", force_zip64=True) as out:
                np.lib.format.write_array(out, np.ascontiguousarray(array), allow_pickle=False)


REMAKE_PREPARED = "run `dvc repro -s prepare -f` to make it again"


def load_arrays(path: str | Path, remake: str = REMAKE_PREPARED) -> dict[str, np.ndarray]:
    """An .npz's arrays; a truncated or damaged file is a CorruptFile naming it."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CorruptFile(f"{path}: unreadable ({_first_line(exc)}); {remake}") from None


def check_archive(path: str | Path, remake: str = REMAKE_PREPARED) -> None:
    """Read every member of a zip-based file (.npz, torch.save) and check its CRC: a damaged
    file fails here, in the driver, in one line, instead of in every Ray worker."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CorruptFile(f"{path}: unreadable ({_first_line(exc)}); {remake}") from None
    if bad is not None:
        raise CorruptFile(f"{path}: damaged member {bad}; {remake}")


def load_checkpoint(
    path: str | Path, remake: str = "remove it (or its run's folder) and run again"
) -> dict[str, Any]:
    """Only tensors and plain containers: never unpickle arbitrary objects. A truncated or
    damaged file is a CorruptFile naming it (`remake`: how to make it again)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise CorruptFile(f"{path}: unreadable ({_first_line(exc)}); {remake}") from None


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else exc.__class__.__name__)[:limit]
