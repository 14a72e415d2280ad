"""The benchmark command's short mode runs end to end, so that it cannot rot.

Benchmarks are not tests: nothing here looks at a number, only that every
section ran and the table came out.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("[data path]", "[control plane: docker run]", "[control plane: plugin API]",
            "[control plane: plugin memory]", "[scale]")
CANNOT_RUN = 3   # bench.run's exit status when this machine lacks what it needs


def test_bench_short_mode_completes_and_prints_the_table(root_required, tmp_path):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--short", "--json", str(tmp_path / "bench.json"),
         "--markdown", str(tmp_path / "bench.md"), "--plot", str(tmp_path / "bench.png")],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    elapsed = time.monotonic() - started
    print(result.stdout)
    print(f"short benchmark took {elapsed:.0f} s", file=sys.stderr)
    if result.returncode == CANNOT_RUN:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-5000:]}"
    header = next((line for line in result.stdout.splitlines() if line.startswith("name ")), "")
    assert header.split() == ["name", "value", "baseline", "ratio", "target", "verdict"], \
        result.stdout
    for section in SECTIONS:
        assert section in result.stdout, f"{section} missing:\n{result.stdout}"
    assert "NOT MEASURED" not in result.stdout, result.stdout
    assert (tmp_path / "bench.json").stat().st_size > 0
    assert "| name | value |" in (tmp_path / "bench.md").read_text()
