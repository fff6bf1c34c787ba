"""The one interface every freeze backend implements, and the one freeze algorithm.

A backend (Linux FIFREEZE, FreeBSD UFS, the demo's in-memory stand-in) does
the single steps: open the targets, flush, freeze one, thaw one, and
`release` (the thaw guard's thaw, from another process through a shared
descriptor).  freeze_all() puts them in order, the same on every system:

  open every target (refused as a whole if any is not what selection chose)
  -> fork the thaw guard (privileged/guard.py) with the deadline
  -> flush -> freeze each, in order, telling the guard after each
  -> stop the guard.

The deadline was stamped before the first flush.  A target is never frozen
after it, and one that a blocked freeze finishes only after it is thawed at
once; meanwhile the guard has thawed the others at the deadline.  Either
every target is frozen when freeze_all() returns, or nothing is and
FreezeFailed names the target that failed.  thaw() never raises.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from privileged.guard import Guard
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

    def open(self, targets: Sequence[Mount]) -> list[int]:
        """One descriptor per target; FreezeFailed (with nothing left open) if any is not
        the filesystem selection chose."""

    def presync(self, targets: Sequence[Mount], fds: Sequence[int]) -> None: ...

    def freeze_one(self, target: Mount, fd: int) -> bool:
        """Freeze it: True, or False if someone else holds it frozen (not ours to thaw);
        FreezeFailed otherwise."""

    def thaw_one(self, held: Held) -> str | None:
        """Thaw and close it; never raises, returns what went wrong."""

    def release(self, fd: int) -> None:
        """The guard's thaw, through a descriptor shared with the child."""

    def close(self, fd: int) -> None:
        """Let go of a descriptor that holds no freeze (never raises)."""

    def recover(self, records: Sequence[tuple[str, str]]) -> list[str]: ...


def freeze_all(freezer: Freezer, targets: Sequence[Mount], *, presync: bool, deadline: float,
               clock: Callable[[], float]) -> list[Held]:
    fds = freezer.open(targets)
    try:
        guard = Guard.start(fds, deadline, freezer.release, clock)
    except OSError as e:
        for fd in fds:
            freezer.close(fd)
        raise FreezeFailed(targets[0].mountpoint if targets else "-", e.errno or errno.EAGAIN,
                           f"cannot start the thaw guard: {e.strerror or e}") from None
    held: list[Held] = []
    failure: BaseException | None = None
    try:
        if presync:
            freezer.presync(targets, fds)
        for i, (m, fd) in enumerate(zip(targets, fds, strict=True)):
            if clock() >= deadline:
                raise FreezeFailed(m.mountpoint, errno.ETIMEDOUT,
                                   "the watchdog's deadline passed before its turn")
            ours = freezer.freeze_one(m, fd)  # may block: the guard keeps the deadline
            held.append(Held(m.mountpoint, m.fs_key, fd if ours else None))
            if ours:
                guard.frozen(i)
            else:
                freezer.close(fd)
            if clock() >= deadline:
                raise FreezeFailed(m.mountpoint, errno.ETIMEDOUT,
                                   "frozen only after the watchdog's deadline: its freeze "
                                   "blocked in the kernel")
    except BaseException as e:
        failure = e
    fired = guard.stop()  # before any thaw or close: on FreeBSD its copies would keep them
    if failure is None and fired:
        failure = FreezeFailed(targets[-1].mountpoint, errno.ETIMEDOUT,
                               "the watchdog's deadline passed while freezing")
    if failure is not None:
        thaw(freezer, held)
        for fd in fds[len(held):]:
            freezer.close(fd)
        raise failure
    return held


def thaw(freezer: Freezer, held: Sequence[Held]) -> list[str]:
    """Thaw in reverse order; what went wrong, never an exception."""
    problems = []
    for h in reversed(held):
        if h.fd is not None:
            problem = freezer.thaw_one(h)
            h.fd = None
            if problem:
                problems.append(problem)
    return problems

