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
ruleset attribute grew with the ABI (8, 16, 24 bytes: handled_access_fs,
handled_access_net, scoped), so it is passed with the size the running
kernel knows; a rule on a file may hold only file rights; struct
landlock_path_beneath_attr is packed (u64 allowed_access, s32 parent_fd).
"""

from __future__ import annotations

import errno
import os
import stat
import struct

from privileged import libc

_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION, _RULE_PATH_BENEATH = 1, 1
WRITE_FILE, READ_FILE, READ_DIR = 1 << 1, 1 << 2, 1 << 3  # the rights granted (1 << 0: execute)
# Filesystem rights each ABI knows: 1, execute ... make_sym; 2, refer; 3, truncate;
# 5, ioctl_dev.  Network (4): TCP bind and connect.  Scopes (6): abstract sockets, signals.
_FS = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}
_FS_LATEST, _NET_TCP, _SCOPES = (1 << 16) - 1, 0b11, 0b11
_PR_SET_NO_NEW_PRIVS = 38
_syscall = libc.function("syscall")


def abi() -> int:
    """The kernel's Landlock ABI version; 0 if it has none, it is disabled at boot, or a
    container's or service manager's seccomp filter refuses it (EPERM: the version query
    fails no other way)."""
    try:
        return _syscall(_CREATE_RULESET, None, 0, _CREATE_RULESET_VERSION)
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
            return 0
        raise OSError(e.errno, f"Landlock: {os.strerror(e.errno or 0)}") from None


def restrict(read_write_file: str | None) -> int:
    """Restrict this process (and what it forks) for good; the ABI used, or 0 when the
    kernel has no Landlock (nothing done)."""
    version = abi()
    if version == 0:
        return 0
    attr = struct.pack("QQQ", _FS.get(version, _FS_LATEST), _NET_TCP * (version >= 4),
                       _SCOPES * (version >= 6))
    try:
        ruleset = _syscall(_CREATE_RULESET, attr, 8 if version < 4 else 16 if version < 6
                           else 24, 0)
        try:
            _allow(ruleset, "/", READ_FILE | READ_DIR)
            if read_write_file is not None and _is_char_device(read_write_file):
                _allow(ruleset, read_write_file, READ_FILE | WRITE_FILE)
            # restrict_self wants no_new_privs or CAP_SYS_ADMIN, which a child started
            # without root (the demo's) lacks; the seccomp filter sets it next anyway.
            libc.function("prctl")(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            _syscall(_RESTRICT_SELF, ruleset, 0)
        finally:
            os.close(ruleset)
    except OSError as e:
        raise OSError(e.errno, f"Landlock: {os.strerror(e.errno or 0)}") from None
    return version


def _allow(ruleset: int, path: str, access: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _syscall(_ADD_RULE, ruleset, _RULE_PATH_BENEATH, struct.pack("=Qi", access, fd), 0)
    finally:
        os.close(fd)


def _is_char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.lstat(path).st_mode)
    except OSError:
        return False
