"""The one freeze algorithm, the interface every freeze backend implements, and the thaw guard.

A backend (Linux FIFREEZE, FreeBSD UFS, the demo's in-memory stand-in) does
the single steps: open the targets, flush, freeze one, thaw one, and
`release` (the thaw guard's thaw, from another process through a shared
descriptor).  freeze_all() puts them in order, the same on every system:

  open every target (refused as a whole if any is not what selection chose)
  -> fork the thaw guard with the deadline
  -> flush -> freeze each, in order, telling the guard after each
  -> stop the guard.

On Linux (a backend with `concurrent`), the targets of one dependency level
(selection.levels) are flushed and frozen at the same time, each by a worker
thread (privileged/concurrent.py), level after level; the thaw goes level by
level in reverse, the same way.  Elsewhere one after another, in order.

The deadline was stamped before the first flush.  A target is never frozen
after it, and one that a blocked freeze finishes only after it is thawed at
once; meanwhile the guard has thawed the others at the deadline.  Either
every target is frozen when freeze_all() returns, or nothing is and
FreezeFailed names the target that failed.  thaw() never raises.

The thaw guard, and why a process: FIFREEZE, syncfs and UFSSUSPEND can block
in the kernel for as long as a filesystem's storage stalls (freeze_super
syncs with s_umount held).  While the child is blocked freezing one target,
the targets it froze before stay frozen, and its own watchdog cannot run.
So for the length of each FREEZE the child forks a guard: it shares the
child's target descriptors (the same open files), learns through a pipe
which targets are frozen, and if the deadline passes before the child says
DONE, it thaws those itself and exits with FIRED.  A thaw needs only the
thawed superblock (Linux thaw_super takes that filesystem's s_umount;
FreeBSD's UFSRESUME acts through the open file, whichever process holds it:
ffs_susp_unsuspend notes that the suspension belongs to the descriptor and
is inherited across fork), so a blocked freeze of one target never delays
the thaw of another.  The guard also thaws at once if the child dies
mid-freeze (the pipe reaches EOF without DONE).  It is a fork of the child,
so it carries the child's confinement, and it stays single-threaded; the
process that suspends UFS stays single-threaded too, as FreeBSD requires.
The guard never logs and never touches the child's socket: it only polls,
reads, thaws and exits.
"""

from __future__ import annotations

import _thread
import errno
import os
import select

from privileged import concurrent
from privileged.mounts import Mount

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Protocol

    from privileged.mounts import Platform

    class Freezer(Protocol):
        platform: Platform
        concurrent: bool  # may freeze and thaw from several threads at once

        def mounts(self, reuse: bool = False) -> list[Mount]: ...

        def open(self, targets: Sequence[Mount]) -> list[int]:
            """One descriptor per target; FreezeFailed (with nothing left open) if any is
            not the filesystem selection chose."""

        def presync(self, targets: Sequence[Mount], fds: Sequence[int]) -> None: ...

        def freeze_one(self, target: Mount, fd: int) -> bool:
            """Freeze it: True, or False if someone else holds it frozen (not ours to
            thaw); FreezeFailed otherwise."""

        def thaw_one(self, held: Held) -> str | None:
            """Thaw and close it; never raises, returns what went wrong."""

        def release(self, fd: int) -> None:
            """The guard's thaw, through a descriptor shared with the child."""

        def close(self, fd: int) -> None:
            """Let go of a descriptor that holds no freeze (never raises)."""

        def recover(self, records: Sequence[tuple[str, str]]) -> list[str]: ...

DONE = 0xFFFF  # the child's last word to its guard; a target's index is below it


class Held:
    """A filesystem that is frozen now.  fd None: frozen by someone else, not ours to thaw."""

    def __init__(self, mountpoint: str, fs_key: str, fd: int | None, level: int = 0) -> None:
        self.mountpoint, self.fs_key, self.fd = mountpoint, fs_key, fd
        self.level = level  # its dependency level: thawed after the levels above it


class FreezeFailed(Exception):
    def __init__(self, mountpoint: str, errno: int, why: str) -> None:
        super().__init__(f"{mountpoint}: {why}")
        self.mountpoint, self.errno, self.why = mountpoint, errno, why


def freeze_all(freezer: Freezer, targets: Sequence[Mount], *, presync: bool, deadline: float,
               clock: Callable[[], float], levels: Sequence[Sequence[int]] | None = None,
               at_deadline: Callable[[], None] = lambda: None) -> list[Held]:
    """`levels`: indices into targets, frozen level after level (default: one each, in
    order).  `at_deadline` runs once the deadline passes while a freeze still blocks."""
    if levels is None or not freezer.concurrent:
        levels = [[i] for i in range(len(targets))]
    fds = freezer.open(targets)
    try:
        guard = Guard(fds, deadline, freezer.release, clock)
    except OSError as e:
        for fd in fds:
            freezer.close(fd)
        raise FreezeFailed(targets[0].mountpoint if targets else "-", e.errno or errno.EAGAIN,
                           f"cannot start the thaw guard: {e.strerror or e}") from None
    held: list[Held | None] = [None] * len(targets)
    failures: list[BaseException] = []
    lock = _thread.allocate_lock()

    def freeze(level: int, i: int) -> None:
        m, fd = targets[i], fds[i]
        try:
            if clock() >= deadline:
                raise FreezeFailed(m.mountpoint, errno.ETIMEDOUT,
                                   "the watchdog's deadline passed before its turn")
            if presync and freezer.concurrent:  # each flushed just before its freeze
                freezer.presync([m], [fd])
            ours = freezer.freeze_one(m, fd)  # may block: the guard keeps the deadline
            with lock:
                held[i] = Held(m.mountpoint, m.fs_key, fd if ours else None, level)
            if ours:
                guard.tell(i)
            else:
                freezer.close(fd)
            if clock() >= deadline:
                raise FreezeFailed(m.mountpoint, errno.ETIMEDOUT, "frozen only after the "
                                   "watchdog's deadline: its freeze blocked in the kernel")
        except BaseException as e:  # recorded, and every other worker stops taking targets
            with lock:
                failures.append(e)

    try:
        if presync and not freezer.concurrent:  # all flushed before the first freeze
            freezer.presync(targets, fds)
        for n, level in enumerate(levels):
            concurrent.each(level, lambda i, n=n: freeze(n, i),  # type: ignore[misc]
                            eager=freezer.concurrent, stop=lambda: bool(failures),
                            at=(deadline, at_deadline), clock=clock)
            if failures:
                break
    except BaseException as e:
        failures.insert(0, e)
    fired = guard.stop()  # before any thaw or close: on FreeBSD its copies would keep them
    ordered = [held[i] for level in levels for i in level if held[i] is not None]
    frozen = [h for h in ordered if h is not None]
    if not failures and fired:
        failures.append(FreezeFailed(targets[-1].mountpoint, errno.ETIMEDOUT,
                                     "the watchdog's deadline passed while freezing"))
    if failures:
        thaw(freezer, frozen)
        done = {h.fs_key for h in frozen}
        for m, fd in zip(targets, fds, strict=True):
            if m.fs_key not in done:
                freezer.close(fd)
        raise failures[0]
    return frozen


def thaw(freezer: Freezer, held: Sequence[Held]) -> list[str]:
    """Thaw level by level, the last frozen first; what went wrong, never an exception."""
    problems: list[str] = []
    ours = [h for h in held if h.fd is not None]
    for level in sorted({h.level for h in ours}, reverse=True):
        group = [h for h in reversed(ours) if h.level == level]

        def one(i: int, group: list[Held] = group) -> None:
            h = group[i]
            problem = freezer.thaw_one(h)
            h.fd = None
            if problem:
                problems.append(problem)

        if freezer.concurrent:
            concurrent.each(range(len(group)), one, eager=False)
        else:
            for i in range(len(group)):
                one(i)
    return problems


class Guard:
    """The thaw guard of one FREEZE, seen from the child: a pid and a pipe."""

    def __init__(self, fds: Sequence[int], deadline: float, release: Callable[[int], None],
                 clock: Callable[[], float]) -> None:
        if len(fds) >= DONE:
            raise OSError(f"cannot guard {len(fds)} targets (at most {DONE - 1})")
        r, self.pipe = os.pipe2(os.O_CLOEXEC)
        self.pid = os.fork()
        if self.pid == 0:  # the guard: never return into the child's stack
            code = 1
            try:
                os.close(self.pipe)
                code = watch(r, fds, deadline, release, clock)
            finally:
                os._exit(code)
        os.close(r)

    def tell(self, index: int) -> None:
        """Target `index` is frozen now (or, DONE, all is well): the guard acts on it."""
        try:
            os.write(self.pipe, index.to_bytes(2, "little"))
        except BrokenPipeError:
            pass  # it fired and is gone: the deadline has passed, which the caller sees

    def stop(self) -> bool:
        """End the guard; True if it fired (what it thawed is thawed)."""
        self.tell(DONE)
        os.close(self.pipe)
        return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1]) != 0


def watch(pipe: int, fds: Sequence[int], deadline: float, release: Callable[[int], None],
          clock: Callable[[], float]) -> int:
    """The guard's whole life: wait for DONE (exit 0), or thaw what is frozen at the deadline
    or when the child dies (exit 1)."""
    frozen: list[int] = []
    pending = b""
    poller = select.poll()
    poller.register(pipe, select.POLLIN)
    while (left := deadline - clock()) > 0:
        if not poller.poll(int(left * 1000) + 1):
            continue
        data = os.read(pipe, 4096)
        if not data:
            break  # the child died mid-freeze: thaw what it froze, now
        pending += data
        while len(pending) >= 2:
            index, pending = int.from_bytes(pending[:2], "little"), pending[2:]
            if index == DONE:
                return 0
            frozen.append(index)
    for index in reversed(frozen):
        try:
            release(fds[index])
        except (OSError, IndexError):
            pass  # thawed already (EINVAL), or nothing we can do from here
    return 1
