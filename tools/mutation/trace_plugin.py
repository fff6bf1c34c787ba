"""pytest plugin for the coverage run: tells the tracer which test runs, notes each test.

Loaded with `-p tools.mutation.trace_plugin` in the coverage copy only.  Writes
tests.json beside the tracer's files: per test, in the order run, its
duration (setup, call and teardown), whether it failed, and its markers.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

_tests: dict[str, dict[str, Any]] = {}


def _tracer() -> ModuleType:
    return importlib.import_module("privileged._mutation_trace")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    tracer = _tracer()
    _tests[item.nodeid] = {"order": len(_tests), "seconds": 0.0, "failed": False,
                           "markers": sorted({m.name for m in item.iter_markers()})}
    tracer.set_test(item.nodeid)
    try:
        yield
    finally:
        tracer.flush()
        tracer.set_test(None)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _tests.get(report.nodeid)
    if entry is not None:
        entry["seconds"] += report.duration
        entry["failed"] = entry["failed"] or report.failed


def pytest_sessionfinish(session: pytest.Session) -> None:
    tracer = _tracer()
    tracer.flush()
    with open(os.path.join(os.path.dirname(tracer.CURRENT), "tests.json"), "w",
              encoding="utf-8") as f:
        json.dump(_tests, f)
