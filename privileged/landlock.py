"""Linux Landlock for the root child: read-only everywhere, the device node its one exception.

Once start-up is over the child writes only through descriptors it already
holds (its socket, its two state files, a pipe to its thaw guard), so the
ruleset grants no write, create, remove, rename, link or exec anywhere; the
one file it may still open for writing is its own device node, which REOPEN
opens read-write.  Rights are checked when a file is opened (already open
descriptors keep theirs), and ioctls on directories are not Landlock's to
restrict, so FIFREEZE and FITHAW on the target directories are unaffected
(seccomp restricts which ioctls).  Where the kernel's ABI has them: no TCP
bind or connect (4+), no abstract Unix sockets or signals outside this
domain (6+).

Facts (Documentation/userspace-api/landlock.rst): the three syscalls are
444, 445 and 446 on every architecture; the ABI version comes from
landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION); the
ruleset attribute grew with the ABI (8, 16, 24 bytes), so it is passed with
the size the running kernel knows; a rule on a file may hold only file rights.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_ABI1 = (1 << 13) - 1  # execute ... make_sym
_FS_BY_ABI = {1: _FS_ABI1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}
_FS_LATEST = (1 << 16) - 1  # ABI 5 added IOCTL_DEV
_NET_TCP = 0b11  # bind, connect (ABI 4)
_SCOPES = 0b11  # abstract Unix sockets, signals (ABI 6)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class Landlock:
    """libc resolved now: nothing is loaded once a filter is on."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)

    def _call(self, *args: object) -> int:
        rc = int(self._libc.syscall(*args))
        if rc < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"Landlock: {os.strerror(e)}")
        return rc

    def abi(self) -> int:
        """The kernel's Landlock ABI version; 0 if it has none, it is disabled at boot, or a
        container's or service manager's seccomp filter refuses it (EPERM: the version
        query fails no other way)."""
        try:
            return self._call(ctypes.c_long(_CREATE_RULESET), None, ctypes.c_size_t(0),
                              ctypes.c_uint32(_CREATE_RULESET_VERSION))
        except OSError as e:
            if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
                return 0
            raise OSError(e.errno, f"Landlock: {e.strerror}") from None

    def restrict(self, read_write_file: str | None) -> int:
        """Restrict this process (and what it forks) for good; the ABI used, or 0 when
        the kernel has no Landlock (nothing done)."""
        abi = self.abi()
        if abi == 0:
            return 0
        attr = _RulesetAttr(_FS_BY_ABI.get(abi, _FS_LATEST),
                            _NET_TCP if abi >= 4 else 0, _SCOPES if abi >= 6 else 0)
        size = 8 if abi < 4 else 16 if abi < 6 else 24
        ruleset = self._call(ctypes.c_long(_CREATE_RULESET), ctypes.byref(attr),
                             ctypes.c_size_t(size), ctypes.c_uint32(0))
        try:
            self._allow(ruleset, "/", READ_FILE | READ_DIR)
            if read_write_file is not None and _is_char_device(read_write_file):
                self._allow(ruleset, read_write_file, READ_FILE | WRITE_FILE)
            self._call(ctypes.c_long(_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0))
        finally:
            os.close(ruleset)
        return abi

    def _allow(self, ruleset: int, path: str, access: int) -> None:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            rule = _PathBeneath(access, fd)
            self._call(ctypes.c_long(_ADD_RULE), ctypes.c_int(ruleset),
                       ctypes.c_int(_RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0))
        finally:
            os.close(fd)


def _is_char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.lstat(path).st_mode)
    except OSError:
        return False
