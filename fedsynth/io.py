"""Atomic file writes: write to a temporary name in the same folder, then rename.

Write failures (disk full, file too large, no permission, a file where a folder should be) are
reported as one :class:`OutputError` naming the path, and no temporary file is left behind.
"""

from __future__ import annotations

import contextlib
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


def check_new_file(path: str | Path, flag: str = "-o", *, overwrite: bool = False) -> Path:
    """The output file ``path`` checked before any work: its folder can hold it, and an existing file is
    replaced only when the user passed ``--overwrite``."""
    out = check_output_path(path, flag, folder=False)
    if out.exists() and not overwrite:
        raise OutputError(f"{flag} {out}: the file exists; pass --overwrite to replace it")
    return out


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


#: the lock file inside a run folder or a site's state folder
LOCK_NAME = ".fedsynth.lock"


#: folders this process holds: resolved path -> [lock file descriptor, holders in this process]
_HELD: dict[Path, list[int]] = {}


class FolderLock:
    """One writer per folder: an exclusive ``flock`` on ``FOLDER/.fedsynth.lock`` held for the life of
    the writer, released by the operating system on any exit (SIGKILL included), so a crashed run
    never leaves a lock behind. A second *process* is refused with the holder's PID, host and
    command; inside one process the lock is shared (a site's cached state and a fresh copy of it are
    one writer). A lock that leaves nothing else behind is cleaned up on release: the lock file, and
    the folder when the lock created it and it is still empty (a failed start leaves no trace).

    ``with FolderLock(run_dir, "train"):`` or ``lock = FolderLock(...).acquire()`` / ``lock.release()``.
    """

    def __init__(self, folder: str | Path, what: str) -> None:
        self.folder = Path(folder)
        self.what = what
        self._key: Path | None = None
        self._created_folder = False

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def acquire(self, wait_s: float = 0.0) -> FolderLock:
        """Take the folder; a holder in another process is waited for up to ``wait_s`` seconds
        (a federated site's previous message may still be exiting), then refused."""
        import fcntl
        import socket
        import time

        deadline = time.monotonic() + wait_s

        if self._key is not None:
            return self
        self._created_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        key = self.folder.resolve()
        if key in _HELD:
            _HELD[key][1] += 1
            self._key = key
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                self._drop_created_folder()
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"cannot lock {self.folder}: {err.strerror}") from None
                raise OutputError(f"{self.folder} is in use by {holder}; wait for it to finish or stop it "
                                  f"(one {self.what} writes a folder at a time)") from None
            try:  # the holder may have released and removed the file between our open and our lock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on host {socket.gethostname()} ({self.what})\n".encode(), 0)
        _HELD[key] = [fd, 1]
        self._key = key
        return self

    def release(self) -> None:
        """Give the folder up (the last holder in this process removes the lock file, and the folder if
        the lock made it and nothing else was written); safe to call twice."""
        if self._key is None:
            return
        held = _HELD[self._key]
        held[1] -= 1
        if held[1] == 0:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # while still locked: a waiting writer re-checks the inode
            os.close(held[0])
            del _HELD[self._key]
            self._drop_created_folder()
        self._key = None

    def _drop_created_folder(self) -> None:
        if self._created_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only when empty

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
