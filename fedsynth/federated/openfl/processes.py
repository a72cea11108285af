"""Processes started by the one-machine trial and the tests: each in its own process group,
logged to a file, and always stopped (SIGTERM, then SIGKILL after a bounded wait)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedsynth.errors import FedsynthError


class ProcessFailed(FedsynthError):
    """A federation process failed or timed out; the message names it and shows its log tail."""


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace", encoding="utf-8").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + ln for ln in text[-lines:])


def run_checked(cmd: Sequence[str], cwd: Path, log: Path, timeout: float, env: dict[str, str] | None = None) -> None:
    """Run one command to completion (own process group, killed on timeout); raise on failure."""
    with ProcessGroup() as group:
        proc = group.start(log.stem, cmd, cwd, log, env)
        try:
            rc = proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ProcessFailed(f"`{' '.join(cmd)}` (in {cwd}) did not finish within {timeout:.0f} s; log {log}:\n{log_tail(log)}") from None
        if rc != 0:
            raise ProcessFailed(f"`{' '.join(cmd)}` (in {cwd}) exited with status {rc}; log {log}:\n{log_tail(log)}")


def run_parallel(cmds: dict[str, Sequence[str]], cwd: Path, logs: Path, timeout: float) -> None:
    """Run independent commands at once (each logged to ``logs/NAME.log``); raise naming the first failure."""
    with ProcessGroup() as group:
        procs = [group.start(name, cmd, cwd, logs / f"{name}.log") for name, cmd in cmds.items()]
        group.wait_all(procs, deadline=time.monotonic() + timeout)


@dataclass
class Managed:
    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class ProcessGroup:
    """Context manager owning every process it starts; ``stop_all`` runs on exit, also on errors."""

    procs: list[Managed] = field(default_factory=list)

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(self, name: str, cmd: Sequence[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> Managed:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            try:
                popen = subprocess.Popen(list(cmd), cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **(env or {})}, start_new_session=True)
            except FileNotFoundError:
                raise ProcessFailed(f"cannot start {name}: command not found: {cmd[0]} "
                                    "(install OpenFL with `pip install 'fedsynth[openfl]'`)") from None
        managed = Managed(name, popen, log)
        self.procs.append(managed)
        return managed

    def stop(self, proc: Managed, grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds, reap the process."""
        if proc.popen.poll() is not None:
            return  # exited and reaped: its group id may be reused, so never signal it again
        _signal_group(proc.popen.pid, signal.SIGTERM)
        try:
            proc.popen.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc.popen.pid, signal.SIGKILL)  # still alive: the leader's pid is the group id
        try:
            proc.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass

    def stop_all(self) -> None:
        for proc in self.procs:
            self.stop(proc)

    def wait_all(self, procs: Sequence[Managed], deadline: float, poll: float = 0.5) -> None:
        """Wait until every one of ``procs`` exits with 0; raise naming the first failure or the stragglers."""
        pending = list(procs)
        while pending:
            for proc in list(pending):
                rc = proc.popen.poll()
                if rc is None:
                    continue
                if rc != 0:
                    raise ProcessFailed(f"{proc.name} exited with status {rc}; log {proc.log}:\n{log_tail(proc.log)}")
                pending.remove(proc)
            if pending and time.monotonic() > deadline:
                names = ", ".join(p.name for p in pending)
                details = "\n".join(f"  {p.name} (log {p.log}):\n{log_tail(p.log, 10)}" for p in pending)
                raise ProcessFailed(f"timed out: still running after the deadline: {names}\n{details}")
            time.sleep(poll)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the process was started with start_new_session: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass
