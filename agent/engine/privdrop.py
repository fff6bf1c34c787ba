"""Drop root for good: groups, gids, uids, verified; no new privileges; the chroot.

Order as OpenSSH's privsep_child_demote and OpenBSD's engine(): chroot (into
an empty root-owned directory, checked first, as btd does) -> chdir("/") ->
setgroups -> setresgid -> setresuid.  Then verify like permanently_set_uid:
every id is the new one and regaining uid 0 or gid 0 fails.  Finally
NO_NEW_PRIVS, so no exec can ever give privileges back.  That is drop()
(agent/engine/chroot.py), used where Linux capabilities are not (FreeBSD).

On Linux the ids go first and the chroot last (become() here, as root; then
enter_chroot() in agent/engine/chroot.py, unprivileged):
root runs only what needs root, and the rest of the parent is imported by the
unprivileged account.  Between the two the process keeps one capability,
CAP_SYS_CHROOT (every other one is gone from all its sets, the bounding set
included), under NO_NEW_PRIVS; enter_chroot() then drops it and checks with
capget() that nothing is left.  Capabilities belong to threads: no thread may
be started before enter_chroot() (agent/mp_logging.py defers its receiver).
"""

from __future__ import annotations

import ctypes
import os
import pwd
import stat
from dataclasses import dataclass

from agent import platforms

PR_SET_KEEPCAPS = 8
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
CAP_SYS_CHROOT = 18
_CAP_VERSION_3 = 0x20080522
PROC_NO_NEW_PRIVS_CTL = 19  # FreeBSD 14+ procctl(2)
P_PID = 0


class DropError(Exception):
    """A one-line reason the privilege drop cannot be done or did not hold."""


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


def lookup_account(name: str) -> Account:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        if platforms.freebsd():
            how = f"pw useradd {name} -d /nonexistent -s /usr/sbin/nologin -c 'hv-vss-agent'"
        else:
            how = (f"useradd --system --no-create-home --home-dir /nonexistent "
                   f"--shell /usr/sbin/nologin {name}")
        raise DropError(f"account {name!r} ([agent] user) does not exist; create it with: {how}") \
            from None
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise DropError(f"account {name!r} has uid {pw.pw_uid} gid {pw.pw_gid}: "
                        "it must not be root's")
    return Account(name, pw.pw_uid, pw.pw_gid)


def check_chroot(path: str) -> None:
    try:
        st = os.lstat(path)
    except OSError as e:
        raise DropError(f"chroot directory {path} ([agent] chroot): {e.strerror}; "
                        f"create it with: mkdir -m 0755 {path}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise DropError(f"chroot directory {path} is not a directory")
    if st.st_uid != 0:
        raise DropError(f"chroot directory {path} is owned by uid {st.st_uid}, not root")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise DropError(f"chroot directory {path} is writable by group or others "
                        f"(mode {stat.S_IMODE(st.st_mode):04o})")
    if os.listdir(path):
        raise DropError(f"chroot directory {path} is not empty")


def no_new_privs() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if platforms.linux():
        rc = libc.prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), ctypes.c_ulong(0),
                        ctypes.c_ulong(0), ctypes.c_ulong(0))
    elif platforms.freebsd():
        arg = ctypes.c_int(1)  # PROC_NO_NEW_PRIVS_ENABLE
        rc = libc.procctl(P_PID, 0, PROC_NO_NEW_PRIVS_CTL, ctypes.byref(arg))
    else:
        return
    if rc != 0:
        e = ctypes.get_errno()
        raise DropError(f"cannot set no-new-privileges: {os.strerror(e)}")


def verify(account: Account) -> None:
    if os.getresuid() != (account.uid,) * 3:
        raise DropError(f"uids are {os.getresuid()} after the drop")
    if os.getresgid() != (account.gid,) * 3:
        raise DropError(f"gids are {os.getresgid()} after the drop")
    if not set(os.getgroups()) <= {account.gid}:
        raise DropError(f"supplementary groups {os.getgroups()} remain after the drop")
    for regain in (os.setuid, os.seteuid, os.setgid, os.setegid):
        try:
            regain(0)
        except PermissionError:
            continue
        raise DropError(f"{regain.__name__}(0) succeeded after dropping privileges")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _prctl(libc: ctypes.CDLL, *args: int) -> int:
    return int(libc.prctl(*(ctypes.c_ulong(a) for a in args)))


def capset(libc: ctypes.CDLL, mask: int) -> None:
    """Effective and permitted = mask (one 64-bit set), inheritable empty."""
    data = (_CapData * 2)()
    for i in (0, 1):
        data[i].effective = data[i].permitted = (mask >> (32 * i)) & 0xFFFFFFFF
    if libc.capset(ctypes.byref(_CapHeader(_CAP_VERSION_3, 0)), data) != 0:
        raise DropError(f"capset: {os.strerror(ctypes.get_errno())}")


def capabilities() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of this thread, each as one 64-bit mask."""
    libc = ctypes.CDLL(None, use_errno=True)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(_CapHeader(_CAP_VERSION_3, 0)), data) != 0:
        raise DropError(f"capget: {os.strerror(ctypes.get_errno())}")

    def mask(field: str) -> int:
        return int(getattr(data[0], field)) | int(getattr(data[1], field)) << 32

    return mask("effective"), mask("permitted"), mask("inheritable")


def become(account: Account) -> None:
    """Linux, root: become the account, keeping CAP_SYS_CHROOT alone for enter_chroot()."""
    libc = ctypes.CDLL(None, use_errno=True)
    cap = 0  # the bounding set, while CAP_SETPCAP is still ours: all but CAP_SYS_CHROOT
    while _prctl(libc, PR_CAPBSET_READ, cap) >= 0:
        if cap != CAP_SYS_CHROOT and _prctl(libc, PR_CAPBSET_DROP, cap) != 0:
            raise DropError(f"cannot drop capability {cap} from the bounding set: "
                            f"{os.strerror(ctypes.get_errno())}")
        cap += 1
    _prctl(libc, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # EINVAL before 4.3: none
    if _prctl(libc, PR_SET_KEEPCAPS, 1) != 0:
        raise DropError(f"PR_SET_KEEPCAPS: {os.strerror(ctypes.get_errno())}")
    os.setgroups([])
    os.setresgid(account.gid, account.gid, account.gid)
    os.setresuid(account.uid, account.uid, account.uid)
    _prctl(libc, PR_SET_KEEPCAPS, 0)
    capset(libc, 1 << CAP_SYS_CHROOT)
    verify(account)
    no_new_privs()
    if capabilities() != (1 << CAP_SYS_CHROOT, 1 << CAP_SYS_CHROOT, 0):
        raise DropError(f"capabilities {capabilities()} after becoming {account.name}")


def open_chroot(path: str) -> int:
    """Root: the checked chroot directory, held open, so that the account need not reach
    it by its path (which may pass through directories only root can search)."""
    check_chroot(path)
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
