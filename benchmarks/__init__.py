"""Benchmark scripts (not tests): speed and memory tables, described in benchmarks/README.md.

Each script runs as ``python benchmarks/<name>.py`` or ``python -m benchmarks.<name>`` from the
repository root; they share their measuring machinery through ``from benchmarks import harness``.
"""
