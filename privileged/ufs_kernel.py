"""The only code that calls FreeBSD's kernel for UFS suspension: one thin seam.

getfsstat(2) through ctypes, and open / ioctl(UFSSUSPEND) / close of
/dev/ufssuspend.  Nothing here decides anything; freeze_freebsd.py does, and
the tests give it a model of ffs_suspend.c (tests/ufs_model.py) in place of
LibcUfsKernel, since no FreeBSD kernel is at hand.

Constants from sys/ufs/ffs/fs.h and include/paths.h:
  UFSSUSPEND = _IOW('U', 1, fsid_t) = 0x80085501 (IOC_IN, 8 bytes)
  UFSRESUME  = _IO('U', 2)          = 0x20005502 (the thaw guard's; the child closes)
"""


from __future__ import annotations

import ctypes
import errno
import fcntl
import os

from privileged import libc
from privileged.statfs_freebsd import MNT_NOWAIT, STATFS_SIZE

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Protocol

    #: getfsstat(buf, bufsize, mode) -> count (buf None: count only); OSError if it fails
    GetFsStat = Callable[[ctypes.Array[ctypes.c_char] | None, int, int], int]

    class UfsKernel(Protocol):
        def getfsstat(self) -> bytes: ...
        def open_suspend(self) -> int: ...
        def suspend(self, fd: int, fsid: bytes) -> None: ...
        def resume(self, fd: int) -> None: ...
        def close(self, fd: int) -> None: ...
        def sync(self) -> None: ...

UFSSUSPEND = 0x80085501
UFSRESUME = 0x20005502
PATH_UFSSUSPEND = "/dev/ufssuspend"


def read_fsstat(call: GetFsStat, attempts: int = 8) -> bytes:
    """Every struct statfs, sized by asking first; retried if mounts appear meanwhile."""
    for _ in range(attempts):
        room = call(None, 0, MNT_NOWAIT) + 4
        buf = ctypes.create_string_buffer(room * STATFS_SIZE)
        got = call(buf, len(buf), MNT_NOWAIT)
        if got < room:  # a full buffer may mean it was too small
            return buf.raw[:got * STATFS_SIZE]
    raise OSError(errno.EAGAIN, "the mount table kept growing while it was read")


class LibcUfsKernel:
    """The real thing, on FreeBSD."""

    def __init__(self) -> None:
        self._getfsstat = libc.function("getfsstat")  # resolved now, before any FREEZE

    def getfsstat(self) -> bytes:
        return read_fsstat(self._getfsstat)

    def open_suspend(self) -> int:
        return os.open(PATH_UFSSUSPEND, os.O_RDWR | os.O_CLOEXEC)

    def suspend(self, fd: int, fsid: bytes) -> None:
        fcntl.ioctl(fd, UFSSUSPEND, fsid)

    def resume(self, fd: int) -> None:
        fcntl.ioctl(fd, UFSRESUME)

    def close(self, fd: int) -> None:
        os.close(fd)

    def sync(self) -> None:
        os.sync()
