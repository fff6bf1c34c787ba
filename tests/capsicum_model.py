"""A model of FreeBSD's Capsicum, for testing agent/sandbox_freebsd.py on Linux.

What it models (cap_rights_limit(2), cap_ioctls_limit(2), cap_enter(2),
sys/kern/sys_capability.c, as read, not run):
- a descriptor starts with every right and no ioctl list (all ioctls);
- rights and ioctl lists can only shrink: asking for more is ENOTCAPABLE;
- a cap_rights_t must be well formed (version 0, index bits 57 and 58 in
  its two words), else EINVAL;
- ioctl(2) needs CAP_IOCTL and, if the descriptor has a list, a command on
  it; read/write need CAP_READ/CAP_WRITE, poll CAP_EVENT, fstat CAP_FSTAT;
- in capability mode, opening a path is ECAPMODE; a kernel built without
  CAPABILITY_MODE answers cap_enter with ENOSYS.

`libc()` exposes the four functions as C function pointers with the real
prototypes, so LibcCapsicum's ctypes marshalling (the cap_rights_t
structure, the unsigned long array, errno) is exercised for real.
"""

from __future__ import annotations

import ctypes
import errno
import os
from types import SimpleNamespace

from agent.sandbox_freebsd import (
    CAP_EVENT,
    CAP_FSTAT,
    CAP_IOCTL,
    CAP_READ,
    CAP_WRITE,
    CapRights,
    capright,
)

ENOTCAPABLE = 93  # FreeBSD's values (sys/sys/errno.h)
ECAPMODE = 94
ALL = (capright(0, 0x7FFFFFFFFFF), capright(1, 0x1FFFFF))  # CAP_ALL0, CAP_ALL1

_errno_location = ctypes.CDLL(None).__errno_location
_errno_location.restype = ctypes.POINTER(ctypes.c_int)


def _fail(err: int) -> int:
    _errno_location()[0] = err  # the C errno, which ctypes copies for get_errno()
    return -1


def _has(words: tuple[int, int], right: int) -> bool:
    idx = {1: 0, 2: 1}[(right >> 57) & 0x1F]  # CAPIDXBIT: bit 57 is word 0, bit 58 word 1
    return words[idx] & right == right


class CapsicumKernel:
    def __init__(self, capability_mode_built_in: bool = True) -> None:
        self.built_in = capability_mode_built_in
        self.in_mode = False
        self.rights: dict[int, tuple[int, int]] = {}
        self.ioctls: dict[int, tuple[int, ...]] = {}

    # --- the system calls -------------------------------------------------------------

    def cap_rights_limit(self, fd: int, words: tuple[int, int]) -> int:
        if not _is_open(fd):
            return _fail(errno.EBADF)
        if words[0] >> 62 != 0 or (words[0] >> 57) & 0x1F != 1 or (words[1] >> 57) & 0x1F != 2:
            return _fail(errno.EINVAL)
        have = self.rights.get(fd, ALL)
        if words[0] & ~have[0] or words[1] & ~have[1]:
            return _fail(ENOTCAPABLE)
        self.rights[fd] = words
        if not _has(words, CAP_IOCTL):
            self.ioctls[fd] = ()
        return 0

    def cap_ioctls_limit(self, fd: int, cmds: tuple[int, ...]) -> int:
        if not _is_open(fd):
            return _fail(errno.EBADF)
        if fd in self.ioctls and not set(cmds) <= set(self.ioctls[fd]):
            return _fail(ENOTCAPABLE)
        self.ioctls[fd] = cmds
        return 0

    def cap_enter(self) -> int:
        if not self.built_in:
            return _fail(errno.ENOSYS)
        self.in_mode = True
        return 0

    def cap_getmode(self) -> int:
        if not self.built_in:
            return -1
        return int(self.in_mode)

    # --- what the kernel then allows on a descriptor ------------------------------------

    def _right(self, fd: int, right: int) -> int:
        return 0 if _has(self.rights.get(fd, ALL), right) else ENOTCAPABLE

    def ioctl(self, fd: int, cmd: int) -> int:
        if self._right(fd, CAP_IOCTL):
            return ENOTCAPABLE
        if fd in self.ioctls and cmd not in self.ioctls[fd]:
            return ENOTCAPABLE
        return 0

    def read(self, fd: int) -> int:
        return self._right(fd, CAP_READ)

    def write(self, fd: int) -> int:
        return self._right(fd, CAP_WRITE)

    def poll(self, fd: int) -> int:
        return self._right(fd, CAP_EVENT)

    def fstat(self, fd: int) -> int:
        return self._right(fd, CAP_FSTAT)

    def open(self, path: str) -> int:
        return ECAPMODE if self.in_mode else 0

    # --- libc, as C function pointers --------------------------------------------------

    def libc(self) -> SimpleNamespace:
        c_int, c_uint, c_ulong = ctypes.c_int, ctypes.c_uint, ctypes.c_ulong

        def rights_limit(fd: int, rights: ctypes._Pointer[CapRights]) -> int:
            return self.cap_rights_limit(fd, tuple(rights.contents.cr_rights))  # type: ignore[arg-type]

        def ioctls_limit(fd: int, cmds: ctypes._Pointer[ctypes.c_ulong], n: int) -> int:
            return self.cap_ioctls_limit(fd, tuple(cmds[i] for i in range(n)))

        def getmode(mode: ctypes._Pointer[ctypes.c_uint]) -> int:
            value = self.cap_getmode()
            if value < 0:
                return _fail(errno.ENOSYS)
            mode[0] = value
            return 0

        proto = ctypes.CFUNCTYPE
        self._keep = [  # callbacks must outlive their use
            proto(c_int, c_int, ctypes.POINTER(CapRights), use_errno=True)(rights_limit),
            proto(c_int, c_int, ctypes.POINTER(c_ulong), ctypes.c_size_t,
                  use_errno=True)(ioctls_limit),
            proto(c_int, use_errno=True)(self.cap_enter),
            proto(c_int, ctypes.POINTER(c_uint), use_errno=True)(getmode),
        ]
        names = ("cap_rights_limit", "cap_ioctls_limit", "cap_enter", "cap_getmode")
        return SimpleNamespace(**dict(zip(names, self._keep, strict=True)))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
