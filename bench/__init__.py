"""Benchmarks of fan-driver against Docker's own networking: `python3 -m bench.run`
from the repository root. The lab is the tests' harness (tests.harness)."""
