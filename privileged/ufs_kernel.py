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
from collections.abc import Callable
from typing import Protocol

from privileged.statfs_freebsd import MNT_NOWAIT, STATFS_SIZE

UFSSUSPEND = 0x80085501
UFSRESUME = 0x20005502
PATH_UFSSUSPEND = "/dev/ufssuspend"

#: getfsstat(buf, bufsize, mode) -> count, or -1 with errno (buf None: count only)
GetFsStat = Callable[[ctypes.Array[ctypes.c_char] | None, int, int], int]


class UfsKernel(Protocol):
    def getfsstat(self) -> bytes: ...
    def open_suspend(self) -> int: ...
    def suspend(self, fd: int, fsid: bytes) -> None: ...
    def resume(self, fd: int) -> None: ...
    def close(self, fd: int) -> None: ...
    def sync(self) -> None: ...


def read_fsstat(call: GetFsStat, attempts: int = 8) -> bytes:
    """Every struct statfs, sized by asking first; retried if mounts appear meanwhile."""
    for _ in range(attempts):
        count = _check(call(None, 0, MNT_NOWAIT))
        room = count + 4
        buf = ctypes.create_string_buffer(room * STATFS_SIZE)
        got = _check(call(buf, len(buf), MNT_NOWAIT))
        if got < room:  # a full buffer may mean it was too small
            return buf.raw[:got * STATFS_SIZE]
    raise OSError(errno.EAGAIN, "the mount table kept growing while it was read")


def _check(rc: int) -> int:
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"getfsstat: {os.strerror(e)}")
    return rc


class LibcUfsKernel:
    """The real thing, on FreeBSD."""

    def __init__(self) -> None:
        # Resolved now: no library loading once the sandbox is on.
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.getfsstat
        fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
        fn.restype = ctypes.c_int
        self._getfsstat: GetFsStat = fn

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
