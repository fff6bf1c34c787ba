"""The one interface every freeze backend implements (Linux FIFREEZE, FreeBSD UFS).

A backend is stateless: the child keeps the list of what it holds.  freeze()
either freezes every target or, after thawing what it froze, raises
FreezeFailed naming the mount; thaw() never raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from privileged.selection import Mount, Platform


@dataclass(slots=True)
class Held:
    """A filesystem that is frozen now.  fd None: frozen by someone else, not ours to thaw."""

    mountpoint: str
    fs_key: str
    fd: int | None


class FreezeFailed(Exception):
    def __init__(self, mountpoint: str, errno: int, why: str) -> None:
        super().__init__(f"{mountpoint}: {why}")
        self.mountpoint = mountpoint
        self.errno = errno
        self.why = why


class Freezer(Protocol):
    platform: Platform

    def mounts(self) -> list[Mount]: ...

    def freeze(self, targets: Sequence[Mount], presync: bool) -> list[Held]: ...

    def thaw(self, held: Sequence[Held]) -> list[str]: ...

    def recover(self, records: Sequence[tuple[str, str]]) -> list[str]: ...
