"""Fixtures: scratch filesystems the tests create, freeze and remove themselves.

These tests need root and loop devices; CI has both, so they are not skipped:
without them they fail, saying so.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

import pytest

from agent import scratch


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
