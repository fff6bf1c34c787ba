"""A freezer that freezes nothing: for the demo when it is not run as root.

It plays two filesystems and keeps their state in memory.  The child refuses
to use it when it runs as root, so root can never be talked into pretending.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from privileged.freezer import Held
from privileged.mounts import Mount
from privileged.mounts_linux import LINUX

MOUNTS = (
    Mount("/memory/a", "ext4", "memory-a", readonly=False, local=True, pseudo=False,
          fs_key="memory:1"),
    Mount("/memory/b", "xfs", "memory-b", readonly=False, local=True, pseudo=False,
          fs_key="memory:2"),
)


class MemoryFreezer:
    platform = LINUX
    concurrent = False

    def __init__(self) -> None:
        self.frozen: set[str] = set()

    def mounts(self, reuse: bool = False) -> list[Mount]:
        return list(MOUNTS)

    def open(self, targets: Sequence[Mount]) -> list[int]:
        # Real descriptors (of nothing in particular), for the thaw guard to be handed.
        return [os.open("/", os.O_PATH | os.O_CLOEXEC) for _ in targets]

    def worth_flushing(self) -> bool:
        return False

    def presync(self, targets: Sequence[Mount], fds: Sequence[int]) -> None:
        pass

    def freeze_one(self, target: Mount, fd: int) -> bool:
        self.frozen.add(target.fs_key)
        return True

    def thaw_one(self, held: Held) -> str | None:
        self.frozen.discard(held.fs_key)
        if held.fd is not None:
            os.close(held.fd)
        return None

    def release(self, fd: int) -> None:
        pass  # the guard is another process: nothing of ours to change from there

    def close(self, fd: int) -> None:
        os.close(fd)

    def recover(self, records: Sequence[tuple[str, str]]) -> list[str]:
        return []
