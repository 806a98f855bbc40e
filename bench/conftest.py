"""Benchmarks (pytest-benchmark) live in ``bench/bench_*.py``, outside ``tests/``, so the test suite never runs
them. Run them explicitly, e.g. ``python -m pytest bench/bench_kernels.py --benchmark-only``; this conftest
also lets ``python -m pytest bench`` collect the ``bench_*.py`` files.
"""
import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") \
            and not parent.session.isinitpath(file_path):  # files named on the command line are collected anyway
        return pytest.Module.from_parent(parent, path=file_path)
    return None
