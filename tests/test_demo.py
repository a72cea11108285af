"""``fedsynth demo`` end to end with a tiny step budget: real slices, samples, held-out scores and the floor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsynth.cli import main
from fedsynth.demo import fast_precision


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_demo_writes_grid_and_scores_next_to_the_real_floor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("nilearn")
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--steps", "4", "--first-stage-steps", "4", "--precision", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert f"look at the samples: {out / 'generated' / 'grid.png'}" in printed and "real training slices score" in printed
    assert (out / "generated" / "grid.png").stat().st_size > 0
    report = json.loads((out / "demo_report.json").read_text(encoding="utf-8"))
    assert report["steps"] == 4 and report["precision_mode"] == "fp32" and report["samples"] == 64
    floor = report["real_vs_real"]
    assert 0 <= report["precision"] <= 1 and 0 < floor["precision"] <= 1 and 0 < floor["recall"] <= 1
    assert floor["precision"] > report["precision"], "real slices must score above a 4-step model"


def test_fast_precision_names_a_training_precision() -> None:
    assert fast_precision() in {"fp32", "bf16"}
