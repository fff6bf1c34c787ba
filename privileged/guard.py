"""The thaw guard: a second root process that keeps the watchdog's deadline while we freeze.

Why a process: FIFREEZE, syncfs and UFSSUSPEND can block in the kernel for as
long as a filesystem's storage stalls (freeze_super syncs with s_umount held).
While the child is blocked freezing one target, the targets it froze before
stay frozen, and its own watchdog cannot run.  So for the length of each
FREEZE the child forks this guard: it shares the child's target descriptors
(the same open files), learns through a pipe which targets are frozen, and
if the deadline passes before the child says DONE, it thaws those itself and
exits with FIRED.  A thaw needs only the thawed superblock (Linux thaw_super
takes that filesystem's s_umount; FreeBSD's UFSRESUME acts through the open
file, whichever process holds it: ffs_susp_unsuspend notes that the
suspension belongs to the descriptor and is inherited across fork), so a
blocked freeze of one target never delays the thaw of another.

The guard also thaws at once if the child dies mid-freeze (the pipe reaches
EOF without DONE).  It is a fork of the child, so it carries the child's
confinement, and it stays single-threaded; the process that suspends UFS
stays single-threaded too, as FreeBSD requires.  The guard never logs and
never touches the child's socket: it only polls, reads, thaws and exits.
"""

from __future__ import annotations

import os
import select
import struct
from collections.abc import Callable, Sequence

_INDEX = struct.Struct("<H")
DONE = 0xFFFF
MAX_TARGETS = DONE - 1
EXIT_DONE = 0
EXIT_FIRED = 1


class Guard:
    def __init__(self, pid: int, pipe: int) -> None:
        self.pid = pid
        self.pipe = pipe

    @classmethod
    def start(cls, fds: Sequence[int], deadline: float, release: Callable[[int], None],
              clock: Callable[[], float]) -> Guard:
        if len(fds) > MAX_TARGETS:
            raise OSError(f"cannot guard {len(fds)} targets (at most {MAX_TARGETS})")
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # the guard: never return into the child's stack
            code = EXIT_FIRED
            try:
                os.close(w)
                code = watch(r, fds, deadline, release, clock)
            finally:
                os._exit(code)
        os.close(r)
        return cls(pid, w)

    def frozen(self, index: int) -> None:
        """Target `index` is frozen now: the guard thaws it if the deadline passes."""
        try:
            os.write(self.pipe, _INDEX.pack(index))
        except BrokenPipeError:
            pass  # it fired and is gone: the deadline has passed, which the caller sees

    def stop(self) -> bool:
        """End the guard; True if it fired (what it thawed is thawed)."""
        try:
            os.write(self.pipe, _INDEX.pack(DONE))
        except OSError:
            pass  # it fired and is gone already
        os.close(self.pipe)
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status) != EXIT_DONE


def watch(pipe: int, fds: Sequence[int], deadline: float, release: Callable[[int], None],
          clock: Callable[[], float]) -> int:
    """The guard's whole life: wait for DONE, or thaw what is frozen at the deadline."""
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
        while len(pending) >= _INDEX.size:
            (index,) = _INDEX.unpack_from(pending)
            pending = pending[_INDEX.size:]
            if index == DONE:
                return EXIT_DONE
            frozen.append(index)
    for index in reversed(frozen):
        try:
            release(fds[index])
        except (OSError, IndexError):
            pass  # thawed already (EINVAL), or nothing we can do from here
    return EXIT_FIRED
