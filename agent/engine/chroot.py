"""The last of the drop, once root is gone: the chroot.

Linux: agent/engine/privdrop.py's become() left the account with
CAP_SYS_CHROOT alone; enter_chroot() uses it and drops it.  FreeBSD, where
capabilities are not used: drop() does the whole drop here, as root.
"""

from __future__ import annotations

import ctypes
import os
import stat

from agent.engine.privdrop import (
    Account,
    DropError,
    capabilities,
    capset,
    check_chroot,
    no_new_privs,
    verify,
)


def enter_chroot(dirfd: int, path: str) -> None:
    """Linux, after become(): the chroot into the directory held open, then the last
    capability goes."""
    st = os.fstat(dirfd)
    if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or os.listdir(dirfd):
        raise DropError(f"chroot directory {path} changed since it was checked")
    os.fchdir(dirfd)
    os.chroot(".")
    os.chdir("/")
    os.close(dirfd)
    capset(ctypes.CDLL(None, use_errno=True), 0)
    if capabilities() != (0, 0, 0):
        raise DropError(f"capabilities {capabilities()} remain after the drop")


def drop(account: Account, chroot: str | None) -> None:
    if chroot is not None:
        check_chroot(chroot)
        os.chroot(chroot)
        os.chdir("/")
    os.setgroups([])
    os.setresgid(account.gid, account.gid, account.gid)
    os.setresuid(account.uid, account.uid, account.uid)
    verify(account)
    no_new_privs()
