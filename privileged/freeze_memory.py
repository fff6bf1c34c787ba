"""A freezer that freezes nothing: for the demo when it is not run as root.

It plays two filesystems and keeps their state in memory.  The child refuses
to use it when it runs as root, so root can never be talked into pretending.
"""

from __future__ import annotations

from collections.abc import Sequence

from privileged.freezer import Held
from privileged.mounts_linux import LINUX
from privileged.selection import Mount

MOUNTS = (
    Mount("/memory/a", "ext4", "memory-a", readonly=False, local=True, pseudo=False,
          fs_key="memory:1"),
    Mount("/memory/b", "xfs", "memory-b", readonly=False, local=True, pseudo=False,
          fs_key="memory:2"),
)


class MemoryFreezer:
    platform = LINUX

    def __init__(self) -> None:
        self.frozen: set[str] = set()

    def mounts(self) -> list[Mount]:
        return list(MOUNTS)

    def freeze(self, targets: Sequence[Mount], presync: bool) -> list[Held]:
        self.frozen |= {m.fs_key for m in targets}
        return [Held(m.mountpoint, m.fs_key, -1) for m in targets]

    def thaw(self, held: Sequence[Held]) -> list[str]:
        for h in held:
            self.frozen.discard(h.fs_key)
            h.fd = None
        return []

    def recover(self, records: Sequence[tuple[str, str]]) -> list[str]:
        return []
