"""Fixtures: scratch filesystems the tests create, freeze and remove themselves.

Most tests need root and loop devices: those that use these fixtures, or are
marked `root`.  As root (CI, `make test`) they all run, and a missing loop
device or filesystem tool is a failure that says so; as anyone else they are
skipped with one reason, and the tests that need no privilege still run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

import pytest

from agent.dev import scratch

ROOT_FIXTURES = frozenset({"workdir", "make_fs", "ext4_xfs"})
NEEDS_ROOT = ("needs root: it makes loop-device filesystems, freezes them or starts the agent "
              "(run `make test` as root)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"root: {NEEDS_ROOT}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """As root, everything runs (and a missing loop device or tool is a failure); as anyone
    else, the tests that need root are skipped with that one reason, the rest run."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason=NEEDS_ROOT)
    for item in items:
        if "root" in item.keywords or ROOT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(skip)


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests need root (they create and freeze loop-device filesystems); "
                    "run `sudo make test`", pytrace=False)
    if not os.path.exists("/dev/loop-control"):
        pytest.fail("these tests need loop devices (/dev/loop-control)", pytrace=False)
    missing = scratch.missing_tools(["ext4", "xfs"])
    if missing:
        pytest.fail(f"missing tools: {', '.join(missing)} (make test installs them)",
                    pytrace=False)


@pytest.fixture
def workdir() -> Iterator[str]:
    """A root-owned directory (mode 0755) outside every scratch filesystem."""
    _require_root()
    d = tempfile.mkdtemp(prefix="hvvss-test-")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_fs(workdir: str) -> Iterator[Callable[..., scratch.ScratchFS]]:
    made: list[scratch.ScratchFS] = []

    def make(fstype: str = "ext4", name: str | None = None, **kw: object) -> scratch.ScratchFS:
        fs = scratch.make(workdir, fstype, name=name or f"{fstype}{len(made)}", **kw)  # type: ignore[arg-type]
        made.append(fs)
        return fs

    try:
        yield make
    finally:
        for fs in reversed(made):
            scratch.destroy(fs)


@pytest.fixture
def ext4_xfs(make_fs: Callable[..., scratch.ScratchFS]) -> list[scratch.ScratchFS]:
    return [make_fs("ext4"), make_fs("xfs")]
