"""The one freeze algorithm, the interface every freeze backend implements, and the thaw guard.

A backend (Linux FIFREEZE, FreeBSD UFS, the demo's in-memory stand-in) does
the single steps: open the targets, flush, freeze one, thaw one, and
`release` (the thaw guard's thaw, from another process through a shared
descriptor).  freeze_all() puts them in order, the same on every system:

  open every target (refused as a whole if any is not what selection chose)
  -> arm the thaw guard with their descriptors and the deadline
  -> flush -> freeze each, in order, telling the guard after each
  -> disarm the guard.

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
So the child forks a guard once, at start-up, before it confines itself
(the guard confines itself the same way; the child's filter then refuses
any further fork).  For each FREEZE the child passes it the targets'
descriptors (SCM_RIGHTS: the same open files) and the deadline, tells it
which targets are frozen, and says DONE at the end; if the deadline passes
first, the guard thaws those itself and answers DONE with FIRED.  A thaw
needs only the thawed superblock (Linux thaw_super takes that filesystem's
s_umount; FreeBSD's UFSRESUME acts through the open file, whichever process
holds it: ffs_susp_unsuspend notes that the suspension belongs to the
descriptor, which passing it keeps), so a blocked freeze of one target never
delays the thaw of another.  The guard also thaws at once if the child dies
mid-freeze (its socket reaches EOF).  Between FREEZEs it holds no target and
waits; if it dies, the child exits (child.py), and its successor forks a new
one.  Forked once rather than at each FREEZE, and answering ARM before the
child freezes: while another process of ours runs on a CPU as FIFREEZE
begins, the kernel's RCU grace periods inside it take a scheduler tick
longer (a fork just before it: 31 ms instead of 24 here).  It
stays single-threaded; the process that suspends UFS stays single-threaded
too, as FreeBSD requires.  The guard never logs and never reads the child's
socket to its parent, which it does not hold: of the child's descriptors it
keeps its end of their link alone.  It only polls, reads, thaws and answers.

The child's records to its guard (one SOCK_SEQPACKET record each): TARGETS
"T" with up to MAX_PASSED descriptors, in order; ARM "A" + the deadline in
microseconds of CLOCK_MONOTONIC (8 bytes, little endian); FROZEN "F" + a
target's index (2 bytes); DONE "D", answered "0" (nothing fired) or "1".
ARM is answered "0" too, once the guard holds what it needs.
"""

from __future__ import annotations

import _socket
import _thread
import errno
import os
import select
import time

from privileged import concurrent, records
from privileged.hardening import quiet_stdio
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

        def worth_flushing(self) -> bool:
            """Would a presync shorten the freeze's own flush by anything that matters?"""

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

MAX_PASSED = 64  # descriptors per TARGETS record (records.receive sees at most 64)


class Held:
    """A filesystem that is frozen now.  fd None: frozen by someone else, not ours to thaw."""

    def __init__(self, mountpoint: str, fs_key: str, fd: int | None, level: int = 0) -> None:
        self.mountpoint, self.fs_key, self.fd = mountpoint, fs_key, fd
        self.level = level  # its dependency level: thawed after the levels above it


class FreezeFailed(Exception):
    def __init__(self, mountpoint: str, errno: int, why: str) -> None:
        super().__init__(f"{mountpoint}: {why}")
        self.mountpoint, self.errno, self.why = mountpoint, errno, why


def freeze_all(freezer: Freezer, guard: Guard | None, targets: Sequence[Mount], *,
               presync: bool, deadline: float, clock: Callable[[], float],
               levels: Sequence[Sequence[int]] | None = None,
               at_deadline: Callable[[], None] = lambda: None) -> list[Held]:
    """`levels`: indices into targets, frozen level after level (default: one each, in
    order).  `at_deadline` runs once the deadline passes while a freeze still blocks."""
    if levels is None or not freezer.concurrent:
        levels = [[i] for i in range(len(targets))]
    fds = freezer.open(targets)
    try:
        if guard is None:
            raise OSError(errno.ECHILD, "there is none")
        guard.arm(fds, deadline)
    except OSError as e:
        for fd in fds:
            freezer.close(fd)
        raise FreezeFailed(targets[0].mountpoint if targets else "-", e.errno or errno.EAGAIN,
                           f"cannot arm the thaw guard: {e.strerror or e}") from None
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
    # Disarmed before any thaw or close: on FreeBSD its copies would keep the suspensions.
    if guard.disarm() and not failures:
        failures.append(FreezeFailed(targets[-1].mountpoint, errno.ETIMEDOUT,
                                     "the watchdog's deadline passed while freezing"))
    frozen = [h for level in levels for i in level if (h := held[i]) is not None]
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
    """The thaw guard, seen from the child: a process forked at start-up, and a socket."""

    def __init__(self, link: tuple[_socket.socket, _socket.socket],
                 release: Callable[[int], None], confine: Callable[[], object],
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`link`: a SOCK_SEQPACKET socketpair (made while 0-2 were taken, so that no
        write to stdout can reach either end)."""
        ours, theirs = link
        self.pid = os.fork()
        if self.pid == 0:  # the guard: never return into the child's stack
            code = 1
            try:
                # Its end of the link alone: not ours, not the child's socket to the parent,
                # its state files or rcu_expedited; then 0-2 as the child has them.
                os.closerange(0, theirs.fileno())
                os.closerange(theirs.fileno() + 1, 1 << 20)  # Linux's nr_open: all
                quiet_stdio()
                confine()
                code = watch(theirs, release, clock)
            finally:
                os._exit(code)
        theirs.close()
        self.sock = ours

    def arm(self, fds: Sequence[int], deadline: float) -> None:
        """Hand it the targets and the deadline, and wait until it has them: FIFREEZE's
        grace periods take a scheduler tick longer while another CPU runs the guard."""
        for i in range(0, len(fds), MAX_PASSED):
            records.send(self.sock, b"T", tuple(fds[i:i + MAX_PASSED]))
        records.send(self.sock, b"A" + int(deadline * 1e6).to_bytes(8, "little"))
        if records.receive(self.sock, 1)[0] != b"0":
            raise OSError(errno.ECHILD, "it is gone")

    def tell(self, index: int) -> None:
        """Target `index` is frozen now (OSError if the guard is gone: the FREEZE fails)."""
        records.send(self.sock, b"F" + index.to_bytes(2, "little"))

    def disarm(self) -> bool:
        """The FREEZE is over; True if the guard fired (what it thawed is thawed) or is
        gone (what it was told is frozen may be frozen or not)."""
        try:
            records.send(self.sock, b"D")
            return records.receive(self.sock, 1)[0] != b"0"
        except (OSError, records.RecordError):
            return True

    def close(self) -> None:
        """The guard exits at EOF; reaped here."""
        self.sock.close()
        os.waitpid(self.pid, 0)


def watch(sock: _socket.socket, release: Callable[[int], None],
          clock: Callable[[], float]) -> int:
    """The guard's whole life: hold each FREEZE's descriptors until DONE, and thaw the
    frozen ones at the deadline, or at once when the child is gone (EOF) or on any error."""
    fds: list[int] = []
    frozen: list[int] = []
    deadline, fired = None, False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)

    def thaw_frozen() -> None:
        while frozen:
            try:
                release(fds[frozen.pop()])
            except (OSError, IndexError):
                pass  # thawed already (EINVAL), or nothing we can do from here

    answer = b""  # sent just before the guard sleeps: the child goes on once it does
    try:
        while True:
            if deadline is not None and clock() >= deadline:
                deadline, fired = None, True
                thaw_frozen()
            wait = -1 if deadline is None else int((deadline - clock()) * 1000) + 1
            if answer:
                records.send(sock, answer)
                answer = b""
            if not poller.poll(wait):
                continue
            record, passed = records.receive(sock, 9, MAX_PASSED)
            kind, value = record[:1], int.from_bytes(record[1:], "little")
            if kind == b"":  # EOF: the child is gone (thawed below, at once)
                return 0
            if kind == b"T":
                fds += passed
            elif kind == b"A":
                deadline, fired, answer = value / 1e6, False, b"0"
            elif kind == b"F":
                frozen.append(value)
            elif kind == b"D":
                answer, deadline = b"1" if fired else b"0", None
                frozen.clear()
                while fds:
                    os.close(fds.pop())
    finally:
        thaw_frozen()
