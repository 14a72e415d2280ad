"""Benchmarks of fan-driver against Docker's own networking: `python3 -m bench.run`."""
import sys
from pathlib import Path

# The benchmark's lab is the tests' harness (tests/harness).
_TESTS = str(Path(__file__).resolve().parents[1] / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
