"""Process-level hygiene for the root child, applied before it reads anything.

Two capabilities instead of root's all (privileged/capabilities.py), no core
dumps and not dumpable (a dump or a ptrace attach would expose root's
memory), an empty environment, cwd "/", umask 077, and a parent-death signal
as a backstop for EOF on the socket.  SIGTERM, never SIGKILL: the child must
get the chance to thaw.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys

from privileged.capabilities import keep_only

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4


def _prctl(option: int, arg: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl({option}): {os.strerror(e)}")


def harden_child(parent_pid: int) -> None:
    if sys.platform.startswith("linux") and os.geteuid() == 0:
        keep_only()  # before anything else: CAP_SYS_ADMIN and CAP_DAC_READ_SEARCH alone
    os.umask(0o077)
    os.chdir("/")
    os.environ.clear()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        _prctl(PR_SET_DUMPABLE, 0)
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        # The parent may have died before the line above: then nobody would
        # ever send the signal.  EOF on the socket still ends us, but say so early.
        if os.getppid() != parent_pid:
            raise SystemExit("hv-vss-agent child: parent is gone")


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
    if sys.platform.startswith("linux"):
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
    """Threads in this process, as the kernel counts them (not just Python's)."""
    if sys.platform.startswith("linux"):
        return len(os.listdir("/proc/self/task"))
    import threading

    return threading.active_count()
