"""FreeBSD: Capsicum for the unprivileged parent, through ctypes.

NOT RUN ON FREEBSD: tested here against a model of the kernel's rules
(tests/capsicum_model.py), through the same ctypes calls.  Facts from
sys/sys/capsicum.h and cap_rights_limit(2), cap_ioctls_limit(2), cap_enter(2):
- cap_rights_t (version 0) is two uint64 words; a right is
  CAPRIGHT(idx, bit) = (1 << (57 + idx)) | bit, and word i carries idx i;
- rights and ioctl lists can only shrink (ENOTCAPABLE otherwise);
- cap_ioctls_limit takes an array of unsigned long;
- in capability mode path lookups fail (ECAPMODE): everything must be open,
  imported and connected first, which the start-up order guarantees;
- a kernel without options CAPABILITY_MODE answers ENOSYS: we refuse to run.

The device descriptor keeps only what agent/kernel/transport.py does with it:
the two VSS ioctls, poll, and fstat (attach() asks whether it is a socket).
A simulator socket standing in for the device keeps recv/send instead.
"""

from __future__ import annotations

import ctypes
import os
import stat
from typing import Protocol

from agent.kernel.freebsd_wire import IOCHVVSSREAD, IOCHVVSSWRITE
from privileged.seccomp import SandboxError


def capright(idx: int, bit: int) -> int:
    return (1 << (57 + idx)) | bit


CAP_READ = capright(0, 0x1)
CAP_WRITE = capright(0, 0x2)
CAP_FSTAT = capright(0, 0x80000)
CAP_GETSOCKNAME = capright(0, 0x200000000)
CAP_GETSOCKOPT = capright(0, 0x400000000)
CAP_EVENT = capright(1, 0x20)
CAP_IOCTL = capright(1, 0x80)

DEVICE_RIGHTS = (CAP_IOCTL, CAP_EVENT, CAP_FSTAT)
DEVICE_IOCTLS = (IOCHVVSSREAD, IOCHVVSSWRITE)
# Python wraps a socket descriptor with getsockname/getsockopt(SO_TYPE, SO_PROTOCOL).
SIMULATOR_RIGHTS = (CAP_READ, CAP_WRITE, CAP_EVENT, CAP_FSTAT, CAP_GETSOCKNAME, CAP_GETSOCKOPT)


def _word_of(right: int) -> int:
    """Which word holds `right`: its index bit (57 + idx) names it (CAPIDXBIT)."""
    return ((right >> 57) & 0x1F).bit_length() - 1


def rights_words(rights: tuple[int, ...]) -> tuple[int, int]:
    """cap_rights_t as its two words (version 0 in the top bits of word 0)."""
    words = [capright(0, 0), capright(1, 0)]
    for r in rights:
        words[_word_of(r)] |= r
    return words[0], words[1]


class Capsicum(Protocol):
    """The four libc calls we make; each raises OSError as libc reports it."""

    def rights_limit(self, fd: int, words: tuple[int, int]) -> None: ...
    def ioctls_limit(self, fd: int, cmds: tuple[int, ...]) -> None: ...
    def enter(self) -> None: ...
    def in_capability_mode(self) -> bool: ...


class CapRights(ctypes.Structure):
    _fields_ = [("cr_rights", ctypes.c_uint64 * 2)]


class LibcCapsicum:
    """Capsicum through libc; `libc` is replaceable for the model in tests."""

    def __init__(self, libc: object | None = None) -> None:
        lib = libc if libc is not None else ctypes.CDLL(None, use_errno=True)
        self._rights_limit = lib.cap_rights_limit  # type: ignore[attr-defined]
        self._rights_limit.argtypes = [ctypes.c_int, ctypes.POINTER(CapRights)]
        self._ioctls_limit = lib.cap_ioctls_limit  # type: ignore[attr-defined]
        self._ioctls_limit.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_ulong),
                                       ctypes.c_size_t]
        self._enter = lib.cap_enter  # type: ignore[attr-defined]
        self._enter.argtypes = []
        self._getmode = lib.cap_getmode  # type: ignore[attr-defined]
        self._getmode.argtypes = [ctypes.POINTER(ctypes.c_uint)]
        for fn in (self._rights_limit, self._ioctls_limit, self._enter, self._getmode):
            fn.restype = ctypes.c_int

    @staticmethod
    def _check(rc: int, what: str) -> None:
        if rc != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"{what}: {os.strerror(e)}")

    def rights_limit(self, fd: int, words: tuple[int, int]) -> None:
        rights = CapRights((ctypes.c_uint64 * 2)(*words))
        self._check(self._rights_limit(fd, ctypes.byref(rights)), "cap_rights_limit")

    def ioctls_limit(self, fd: int, cmds: tuple[int, ...]) -> None:
        arr = (ctypes.c_ulong * max(1, len(cmds)))(*cmds)
        self._check(self._ioctls_limit(fd, arr, len(cmds)), "cap_ioctls_limit")

    def enter(self) -> None:
        self._check(self._enter(), "cap_enter")

    def in_capability_mode(self) -> bool:
        mode = ctypes.c_uint(0)
        self._check(self._getmode(ctypes.byref(mode)), "cap_getmode")
        return mode.value == 1


def limit_device(fd: int, caps: Capsicum) -> None:
    """Leave `fd` (the VSS device, or the simulator's socket) only what we use."""
    try:
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            caps.rights_limit(fd, rights_words(SIMULATOR_RIGHTS))
            return
        caps.rights_limit(fd, rights_words(DEVICE_RIGHTS))
        caps.ioctls_limit(fd, DEVICE_IOCTLS)
    except OSError as e:
        raise SandboxError(f"cannot limit the VSS device descriptor: {e.strerror}") from None


def enter_capability_mode(device_fd: int, caps: Capsicum) -> None:
    limit_device(device_fd, caps)
    try:
        caps.enter()
        entered = caps.in_capability_mode()
    except OSError as e:
        raise SandboxError(f"cannot enter Capsicum capability mode: {e.strerror} "
                           "(a kernel without options CAPABILITY_MODE?)") from None
    if not entered:
        raise SandboxError("cap_enter() succeeded but the process is not in capability mode")
