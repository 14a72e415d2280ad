"""Unit tests: pure logic, no root."""
