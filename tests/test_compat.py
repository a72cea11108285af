"""Framework patches live in one module and refuse a framework series they were not written for."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fedsynth.errors import FedsynthError
from fedsynth.federated import compat

PACKAGE = Path(__file__).resolve().parents[1] / "fedsynth"


def test_the_installed_series_is_accepted() -> None:
    assert compat.require_series("flwr", compat.FLOWER_SERIES, "x").startswith(compat.FLOWER_SERIES)
    assert compat.require_series("openfl", compat.OPENFL_SERIES, "x").startswith(compat.OPENFL_SERIES)


def test_another_series_is_refused_naming_both_versions() -> None:
    installed = compat.installed_version("flwr")
    with pytest.raises(FedsynthError, match=rf"the idle poll was written for flwr 0\.1\.x, but flwr {installed} is installed"):
        compat.require_series("flwr", ("0.1",), "the idle poll")
    with pytest.raises(FedsynthError, match=r"needs no-such-framework 1\.0\.x, which is not installed"):
        compat.require_series("no-such-framework", ("1.0",), "a patch")


def test_a_prefix_is_not_a_series() -> None:
    """1.2 must not match 1.23.x."""
    with pytest.raises(FedsynthError):
        compat.require_series("flwr", (compat.FLOWER_SERIES[0][:-1],), "a patch")


def test_no_framework_internals_are_patched_outside_compat() -> None:
    """Assignments to attributes of flwr/openfl objects and os._exit appear only in compat.py."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "compat.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            text = ast.unparse(node) if isinstance(node, ast.Call | ast.Assign) else ""
            if isinstance(node, ast.Call) and text.startswith("os._exit("):
                offenders.append(f"{path.name}:{node.lineno} {text}")
            if isinstance(node, ast.Assign) and any(
                    w in text for w in ("_get_sleep_time", "valid_collaborator_cn_and_id", "MetricWriter.", "loop.time",
                                        "server.uri")):
                offenders.append(f"{path.name}:{node.lineno} {text}")
    assert offenders == []


def test_a_reply_cut_off_mid_upload_does_not_outlast_the_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """flwr 1.23 retries a reply's missing objects for up to two hours; bounded, the ServerApp gets
    an incomplete reply back within the round (and does not mistake it for a lost instruction)."""
    import time

    import flwr.server.grid.grpc_grid as grid
    from flwr.common.inflatable_utils import ObjectUnavailableError

    monkeypatch.setattr(grid, "pull_objects", grid.pull_objects)  # restored after the test

    def never_arrives(object_id: str) -> bytes:
        raise ObjectUnavailableError(object_id)

    compat.bound_reply_downloads(lambda: 1.0)
    t0 = time.monotonic()
    with pytest.raises(ObjectUnavailableError, match=compat.INCOMPLETE_REPLY):
        grid.pull_objects(object_ids=["a", "b"], pull_object_fn=never_arrives)
    assert time.monotonic() - t0 < 5


def test_the_supernode_file_store_writes_atomically_and_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader never sees a half-written FAB or .META; storing the same FAB again leaves the files alone."""
    import os

    from flwr.supercore.ffs.disk_ffs import DiskFfs

    monkeypatch.setattr(DiskFfs, "put", DiskFfs.put)  # restored after the test
    compat.atomic_flower_file_store()
    store = DiskFfs(str(tmp_path))
    key = store.put(b"fab bytes", {"sha256": "x"})
    inode = os.stat(tmp_path / f"{key}.META").st_ino
    assert store.put(b"fab bytes", {"sha256": "x"}) == key
    assert os.stat(tmp_path / f"{key}.META").st_ino == inode  # not rewritten
    assert store.get(key) == (b"fab bytes", {"sha256": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([key, f"{key}.META"])  # no temporary file left
