"""Benchmarks of fan-driver against Docker's own networking: `python3 -m bench.run`."""
