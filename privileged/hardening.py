"""Process-level hygiene for the root child, applied before it reads anything.

Capabilities first (Linux): the child keeps two and gives up every other one,
for good.  FIFREEZE and FITHAW need CAP_SYS_ADMIN (ioctl_fsfreeze,
ioctl_fsthaw).  CAP_DAC_READ_SEARCH lets it open any mountpoint read-only,
whoever owns the directory and every directory on the way (a home directory
of mode 0700 is mounted and frozen like any other).  Nothing else it does
needs one: its config, state directory and device node are root's own (uid 0
is their owner), /proc/self and /sys are readable by all.  Without
CAP_DAC_OVERRIDE, CAP_CHOWN, CAP_FOWNER, CAP_SETUID, CAP_SYS_MODULE,
CAP_SYS_PTRACE, CAP_NET_* ... a compromised child cannot write a file root
does not own through a permission, take another uid, load a module or trace
a process.  Dropped from the bounding set (needs CAP_SETPCAP, dropped last),
the ambient set, and the effective, permitted and inheritable sets, in that
order.

Then: no core dumps and not dumpable (a dump or a ptrace attach would expose
root's memory), an empty environment, cwd "/", umask 077, and a parent-death
signal as a backstop for EOF on the socket.  SIGTERM, never SIGKILL: the
child must get the chance to thaw.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import sys

from privileged import libc
from privileged.system import LINUX

CAP_DAC_READ_SEARCH, CAP_SETPCAP, CAP_SYS_ADMIN = 2, 8, 21
KEEP = frozenset({CAP_DAC_READ_SEARCH, CAP_SYS_ADMIN})
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_READ, PR_CAPBSET_DROP = 1, 4, 23, 24
PR_CAP_AMBIENT = 47
_CAP_AMBIENT_CLEAR_ALL, _CAPABILITY_VERSION_3 = 4, 0x20080522
SIGTERM = 15  # on Linux and FreeBSD (the signal module would load enum and more)
if LINUX:
    _prctl, _capget, _capset = (libc.function(f) for f in ("prctl", "capget", "capset"))


def keep_only(keep: frozenset[int] = KEEP) -> None:
    """Leave this process with exactly `keep` (if it had them); OSError if it cannot."""
    # Every capability the kernel knows: PR_CAPBSET_READ says EINVAL past the last one
    # (/proc/sys/kernel/cap_last_cap would say so too, but a unit's ProcSubset=pid hides it).
    known = []
    for cap in range(64):
        try:
            known.append((cap, _prctl(PR_CAPBSET_READ, cap, 0, 0, 0)))
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            break
    for cap, bounded in sorted(known, key=lambda c: c[0] == CAP_SETPCAP):
        try:
            if bounded and cap not in keep:
                _prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
        except OSError as e:
            raise OSError(e.errno, "cannot drop capabilities from the bounding set without "
                          "CAP_SETPCAP (add it to the unit's CapabilityBoundingSet)"
                          if e.errno == errno.EPERM else e.strerror) from None
    _prctl(PR_CAP_AMBIENT, _CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)  # version, pid (0: this one)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: capabilities 0-31, 32-63
    _capget(header, data)
    for word in (0, 1):
        mask = sum(1 << (cap % 32) for cap in keep if cap // 32 == word)
        mask &= data[3 * word + 1]  # never ask for one we do not have
        data[3 * word:3 * word + 3] = [mask, mask, 0]
    _capset(header, data)


def harden_child(parent_pid: int) -> None:
    if LINUX and os.geteuid() == 0:
        keep_only()  # before anything else: CAP_SYS_ADMIN and CAP_DAC_READ_SEARCH alone
    os.umask(0o077)
    os.chdir("/")
    os.environ.clear()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if LINUX:
        _prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        _prctl(PR_SET_PDEATHSIG, SIGTERM, 0, 0, 0)
        # The parent may have died before the line above: then nobody would ever send
        # the signal.  EOF on the socket still ends us, but say so early.
        if os.getppid() != parent_pid:
            raise OSError(errno.ESRCH, "the parent is gone")


def quiet_stdio() -> None:
    """Let go of the stdin, stdout and stderr the parent gave, once the log channel is up.

    Whatever the parent gave us (a terminal, a pipe, a log file) could be on a
    frozen filesystem or stop being read; a write there (Python's own last-resort
    messages) would then block the only process that can thaw.  On FreeBSD a
    file open for writing on a filesystem also makes UFSSUSPEND refuse us
    (EDEADLK, descrip_check_write_mp).  Start-up failures before this point
    still reach the parent's stderr.

    Linux: closed, so that the socket is the child's only descriptor; sys.std*
    go first, so that nothing in Python writes through them to whatever is
    opened next on 0-2 (a read-only directory, briefly a state record).
    FreeBSD: /dev/null instead, so that 0-2 stay taken: a /dev/ufssuspend
    descriptor there would turn a stray write into a raw write to the disk
    while suspended (ffs_susp_rdwr)."""
    if LINUX:
        for name in ("stdin", "stdout", "stderr", "__stdin__", "__stdout__", "__stderr__"):
            setattr(sys, name, None)
        for fd in (0, 1, 2):
            try:
                os.close(fd)
            except OSError:
                pass
        return
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd != null:
            os.dup2(null, fd, inheritable=False)
    if null > 2:
        os.close(null)


def thread_count() -> int:
    """Threads in this process: as the kernel counts them on Linux, elsewhere as Python
    does (the child starts none, so any would be Python's)."""
    return len(os.listdir("/proc/self/task")) if LINUX else len(sys._current_frames())
