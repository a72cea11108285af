"""The benchmark suite keeps working: ``benchmarks/run.py --quick`` writes a RESULTS file with its ratios."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # trains beyond a step or spawns processes
@pytest.mark.timeout(2500)
def test_benchmark_suite_quick(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "-o", str(out)],
                          capture_output=True, text=True, timeout=2400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    assert "Command: `python benchmarks/run.py --quick" in text and "Machine:" in text
    # each measured section has its own bold ratios (a section present only as a "skipped" line fails)
    for title, ratios in (("Engine step vs hand-written PyTorch loop", 1), ("Quality: each family", 6),
                          ("Federated vs centralized vs single-site", 4), ("Text conditioning: prompt adherence", 3)):
        body = _section(text, title)
        assert body.count("**") >= 2 * ratios, f"section '{title}' has no measured ratios:\n{body}"
        assert "| nan" not in body and "| inf" not in body
    quality = _section(text, "Quality: each family")
    assert "| real train vs real held-out (floor) |" in quality  # every quality table starts with the floor
    assert quality.count("| real train vs real held-out (floor) |") == 1 and "held-out" in quality
    text_section = _section(text, "Text conditioning: prompt adherence")
    assert "| real held-out slices (reader ceiling" in text_section and "shuffled prompts" in text_section
    # --quick runs no external script: each is listed as skipped, none is claimed as measured
    external = _section(text, "other scripts")
    for what in ("Flower overhead", "OpenFL overhead", "DP overhead"):
        line = next((ln for ln in external.splitlines() if what in ln), "")
        assert "skipped in --quick" in line, f"'{what}' is neither measured nor reported as skipped: {line!r}"


def _section(text: str, title: str) -> str:
    """The body of the ``## ...title...`` section (up to the next ``## ``)."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("## ") and title in ln), None)
    assert start is not None, f"no section '{title}'"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start + 1:end])
