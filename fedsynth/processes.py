"""Child processes of fedsynth's drivers (the Flower and OpenFL trials, DDP rendezvous, tests).

- :func:`free_port`: a TCP port free on 127.0.0.1.
- :class:`ProcessGroup`: named processes, each logged to a file (``stdin`` from ``/dev/null``)
  and in its own session (process group); on Linux each also gets SIGTERM if fedsynth dies
  without cleaning up. Stopping one signals its whole group (SIGTERM, SIGKILL after a grace
  period), so helper processes it started go too. A context manager: everything is stopped
  on the way out, also on errors. :class:`ProcessFailed` names the process, its exit status
  and the tail of its log.
- :func:`sigterm_raises`: SIGTERM becomes ``SystemExit`` while processes run, so ``finally``
  blocks (and the group's ``__exit__``) still stop them.

Every wait is bounded. Use :func:`contextlib.chdir` to run something in another folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedsynth.errors import FedsynthError

HOST = "127.0.0.1"

#: console scripts fedsynth starts -> the extra that installs them
_EXTRAS = {"fx": "openfl", "flwr": "flower", "flower-superlink": "flower", "fedsynth-supernode": "flower"}


class ProcessFailed(FedsynthError):
    """A child process failed to start, exited with an error or timed out; the message names it and shows its log tail."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def console_script(name: str) -> str:
    """A console script of this Python environment (works without an activated venv), else from PATH."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.is_file() else shutil.which(name)
    if not found:
        raise ProcessFailed(f"'{name}' not found{_install_hint(name)}")
    return found


def _install_hint(command: str) -> str:
    extra = _EXTRAS.get(Path(command).name)
    return f": install the {extra} extra (pip install 'fedsynth[{extra}]')" if extra else ""


def log_tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log, indented (``(no log)`` if it cannot be read)."""
    try:
        text = path.read_text(errors="replace", encoding="utf-8").splitlines()
    except OSError:
        return "    (no log)"
    return "\n".join("    " + ln for ln in text[-lines:])


def group_exists(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` is still there."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _dies_with_parent() -> None:
    """In the child before exec (after ``setsid``): SIGTERM when fedsynth dies (Linux).

    If the driver itself is SIGKILLed (no ``finally`` runs), its children still get SIGTERM and stop.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


@dataclass
class Managed:
    """One started process: its name, ``Popen`` and log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        """The process id, also its process group id (it leads its own session)."""
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def failure(self, why: str, lines: int = 25) -> ProcessFailed:
        """A :class:`ProcessFailed` naming this process, ``why`` and the tail of its log."""
        return ProcessFailed(f"{self.name} {why}; log {self.log}:\n{log_tail(self.log, lines)}")


@dataclass
class ProcessGroup:
    """Named child processes, each in its own process group; a context manager that stops them all."""

    grace: float = 10.0  # seconds between SIGTERM and SIGKILL
    procs: dict[str, Managed] = field(default_factory=dict)
    stopped: set[str] = field(default_factory=set)  # names stopped on purpose (not a crash)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(self, name: str, cmd: Sequence[str], cwd: Path, log: Path, env: Mapping[str, str] | None = None) -> Managed:
        """Start ``cmd`` in ``cwd`` (created if missing), output appended to ``log``, ``env`` set over this
        process's environment. A name may be reused once its previous process has exited."""
        previous = self.procs.get(name)
        if previous is not None:
            if previous.alive():
                raise ProcessFailed(f"cannot start {name}: a process of that name is still running (pid {previous.pid})")
            self.stop(name)  # its group may outlive it
        log.parent.mkdir(parents=True, exist_ok=True)
        Path(cwd).mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            try:
                popen = subprocess.Popen(list(cmd), cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **(env or {})}, start_new_session=True,
                                         preexec_fn=_dies_with_parent)
            except FileNotFoundError:
                raise ProcessFailed(f"cannot start {name}: command not found: {cmd[0]}{_install_hint(cmd[0])}") from None
        self.procs[name] = managed = Managed(name, popen, log)
        self.stopped.discard(name)
        return managed

    def alive(self, name: str) -> bool:
        return name in self.procs and self.procs[name].alive()

    def crashed(self, name: str) -> bool:
        """Exited although nobody asked it to stop."""
        return name in self.procs and name not in self.stopped and not self.procs[name].alive()

    def tail(self, name: str, lines: int = 25) -> str:
        proc = self.procs.get(name)
        return log_tail(proc.log, lines) if proc is not None else ""

    def stop(self, name: str, sig: int = signal.SIGTERM, grace: float | None = None) -> None:
        """Send ``sig`` to the whole process group of ``name``; SIGKILL what is left after ``grace`` s."""
        proc = self.procs.get(name)
        if proc is None:
            return
        self.stopped.add(name)
        grace = self.grace if grace is None else grace
        # once the leader is reaped its pid can only be reused after its whole group is gone
        # (the kernel keeps a pgid in use), so a group that still exists is still ours
        if proc.alive() or group_exists(proc.pid):
            _signal_group(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=grace)
        if group_exists(proc.pid):  # the group may outlive its leader (e.g. a flwr-clientapp child)
            _signal_group(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=5)
        deadline = time.monotonic() + 10.0  # children re-parented to init disappear a moment later
        while time.monotonic() < deadline and group_exists(proc.pid):
            time.sleep(0.1)

    def stop_all(self, grace: float | None = None) -> None:
        """Stop every process, the last started first."""
        for name in reversed(list(self.procs)):
            self.stop(name, grace=grace)

    def check(self, proc: Managed) -> bool:
        """Whether ``proc`` has exited with status 0; raise :class:`ProcessFailed` if it exited with another."""
        rc = proc.popen.poll()
        if rc not in (None, 0):
            raise proc.failure(f"exited with status {rc}")
        return rc == 0

    def wait_all(self, procs: Sequence[Managed], deadline: float, poll: float = 0.5) -> None:
        """Wait until every one of ``procs`` exits with 0; raise naming the first failure or the stragglers."""
        pending = list(procs)
        while pending:
            pending = [proc for proc in pending if not self.check(proc)]
            if pending and time.monotonic() > deadline:
                names = ", ".join(p.name for p in pending)
                details = "\n".join(f"  {p.name} (log {p.log}):\n{log_tail(p.log, 10)}" for p in pending)
                raise ProcessFailed(f"timed out: still running after the deadline: {names}\n{details}")
            if pending:
                time.sleep(poll)

    def wait_for_port(self, name: str, port: int, timeout: float) -> None:
        """Wait until something listens on 127.0.0.1:``port`` while process ``name`` runs (bounded)."""
        proc = self.procs[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise proc.failure(f"exited with status {proc.popen.returncode} before listening on {HOST}:{port}")
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex((HOST, port)) == 0:
                    return
            time.sleep(0.2)
        raise proc.failure(f"is not listening on {HOST}:{port} after {timeout:.0f} s")


def run_checked(cmd: Sequence[str], cwd: Path, log: Path, timeout: float, env: Mapping[str, str] | None = None) -> None:
    """Run one command to completion (own process group, killed on timeout); raise on failure."""
    what = f"`{' '.join(cmd)}` (in {cwd})"
    with ProcessGroup() as group:
        proc = group.start(what, cmd, cwd, log, env)
        group.wait_all([proc], deadline=time.monotonic() + timeout, poll=0.1)


def run_parallel(cmds: Mapping[str, Sequence[str]], cwd: Path, logs: Path, timeout: float) -> None:
    """Run independent commands at once (each logged to ``logs/NAME.log``); raise naming the first failure."""
    with ProcessGroup() as group:
        procs = [group.start(name, cmd, cwd, logs / f"{name}.log") for name, cmd in cmds.items()]
        group.wait_all(procs, deadline=time.monotonic() + timeout)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit(128 + SIGTERM)`` inside the block (main thread only; elsewhere a no-op),
    so the processes it runs are stopped on the way out; the previous handler is restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_on_sigterm() -> None:
    """A long-running child (a site worker): exit with status 0 on SIGTERM (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))


def host_memory_available() -> int:
    """Bytes of memory this machine can still give a process (Linux ``MemAvailable``; else free pages)."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))

