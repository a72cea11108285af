"""The benchmark suite keeps working: ``benchmarks/run.py --quick`` writes a RESULTS file with its ratios."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_benchmark_suite_quick(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "-o", str(out)],
                          capture_output=True, text=True, timeout=580, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    assert "Command: `python benchmarks/run.py --quick" in text and "Machine:" in text
    for section in ("Engine step vs hand-written PyTorch loop", "sampling", "Federated vs centralized vs single-site",
                    "DP overhead"):
        assert section in text
    assert text.count("**") >= 8  # the bold ratios are there
    assert "| nan" not in text and "| inf" not in text
