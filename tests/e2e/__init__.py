"""End-to-end tests: real dockerd in network namespaces (tests/harness)."""
