"""Benchmarks: each compares meterstream against a bare baseline measured in the same run."""
