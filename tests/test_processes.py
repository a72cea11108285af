"""The process utility both trials use (fedsynth.processes): whole groups stopped, clear failures."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from fedsynth.processes import ProcessFailed, ProcessGroup, free_port, group_exists, run_checked, sigterm_raises


def test_stop_ends_the_whole_process_group_also_after_its_leader_exited(tmp_path: Path) -> None:
    """A child the leader left behind (as flwr-clientapp is) is killed with the group."""
    orphan = tmp_path / "orphan.pid"
    script = (f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
              f"open({str(orphan)!r}, 'w').write(str(p.pid)); print('started', flush=True)")
    with ProcessGroup(grace=2) as group:
        leader = group.start("leader", [sys.executable, "-c", script], tmp_path / "cwd", tmp_path / "logs" / "leader.log")
        leader.popen.wait(timeout=30)
        assert group.check(leader) and group_exists(leader.pid)  # exited with 0, its child still runs
    assert not group_exists(leader.pid)
    assert "started" in (tmp_path / "logs" / "leader.log").read_text(encoding="utf-8")
    assert not group.crashed("leader")  # stopped on purpose


def test_a_failure_names_the_process_its_status_and_its_log(tmp_path: Path) -> None:
    with ProcessGroup() as group:
        group.start("server", [sys.executable, "-c", "print('bad certificate'); raise SystemExit(4)"], tmp_path,
                    tmp_path / "server.log")
        with pytest.raises(ProcessFailed, match=r"server exited with status 4 before listening on 127.0.0.1:\d+; "
                                                r"log .*server.log:\n    bad certificate"):
            group.wait_for_port("server", free_port(), timeout=30)
        assert group.crashed("server")
    with pytest.raises(ProcessFailed, match=r"`.*` \(in .*\) exited with status 2"):
        run_checked([sys.executable, "-c", "raise SystemExit(2)"], tmp_path, tmp_path / "cmd.log", timeout=30)
    with pytest.raises(ProcessFailed, match="cannot start fx: command not found: .*fx: install the openfl extra"):
        with ProcessGroup() as group:
            group.start("fx", [str(tmp_path / "fx")], tmp_path, tmp_path / "fx.log")


def test_a_running_name_is_not_started_twice(tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    with ProcessGroup(grace=2) as group:
        first = group.start("site1", sleeper, tmp_path, tmp_path / "site1.log")
        with pytest.raises(ProcessFailed, match="site1: a process of that name is still running"):
            group.start("site1", sleeper, tmp_path, tmp_path / "site1.log")
        group.stop("site1", sig=signal.SIGKILL)
        again = group.start("site1", sleeper, tmp_path, tmp_path / "site1.log")  # a restart after a stop
        assert not first.alive() and again.alive() and "site1" not in group.stopped
    assert not again.alive()


def test_sigterm_raises_system_exit_and_restores_the_handler() -> None:
    import os

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exited, sigterm_raises():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert exited.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
