"""Atomic file writes: write to a temporary name in the same folder, then rename.

Write failures (disk full, file too large, no permission, a file where a folder should be) are
reported as one :class:`OutputError` naming the path, and no temporary file is left behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fedsynth.errors import OutputError

#: torch's zip writer turns a failed write into RuntimeError with one of these texts
_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")
TEMP_GLOB = ".*.tmp"


def _write_error(target: Path, err: BaseException) -> OutputError:
    free = ""
    try:
        free = f"; {shutil.disk_usage(target.parent).free} bytes free in {target.parent}"
    except OSError:
        pass
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        why = "no space left on device"
    elif isinstance(err, OSError) and err.errno == errno.EFBIG:
        why = "file too large (a file-size limit or a full disk)"
    elif isinstance(err, OSError):
        why = err.strerror or type(err).__name__
    else:
        why = f"the write failed ({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}): is the disk full?"
    return OutputError(f"cannot write {target}: {why}{free}")


def check_output_path(path: str | Path, flag: str = "-o", *, folder: bool) -> Path:
    """Refuse an output path that cannot be created: a file where a folder is needed, or the reverse."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path}: is an existing file, expected a folder (or a new name)")
    if not folder and path.is_dir():
        raise OutputError(f"{flag} {path}: is an existing folder, expected a file name")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{flag} {path}: {parent} is a file, so nothing can be created under it")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputError(f"{flag} {path}: no permission to write in {parent}")
            break
    return path


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete temporary files an interrupted (killed) atomic write left in ``folder``."""
    removed = []
    for tmp in Path(folder).glob(TEMP_GLOB):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@contextmanager
def atomic_path(target: Path, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` if the block succeeds.

    On any exception the temporary file is removed and ``target`` is left untouched; a killed
    process leaves ``target`` old or new, never half-written (``durable``: also after a power
    loss, by syncing the file before the rename).
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as err:
        raise _write_error(target, err) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if durable:
            with tmp_path.open("rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        raise _write_error(target, err) from None
    except RuntimeError as err:
        tmp_path.unlink(missing_ok=True)
        if any(s in str(err) for s in _WRITE_FAILURES):
            raise _write_error(target, err) from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write(target: Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and atomically move the result onto ``target``."""
    with atomic_path(target) as tmp:
        writer(tmp)


def atomic_write_text(target: Path, text: str) -> None:
    """Write ``text`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
