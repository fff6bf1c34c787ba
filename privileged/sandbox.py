"""The root child's system-call sandbox (see SECURITY.md, "The root child").

Installed by main() after start-up work (config read, crash recovery, libc
resolved) and before the first request is read.  Linux only: on FreeBSD the
child must open /dev/ufssuspend once per filesystem at FREEZE time, which
Capsicum's capability mode forbids (see SECURITY.md, "Known limits").

Every refusal is an errno, never a kill: a root child killed while it holds
freezes would leave them frozen (a Linux freeze outlives its process), while
a refused call is an OSError that every path of the child answers by thawing.
The syscalls below were measured with strace on the real agent driven by the
simulator (tools/measure_syscalls.py): CHECK, FREEZE, THAW, the watchdog,
REOPEN, a signal, QUIT.  Names another architecture or glibc version uses for
the same operation are listed with them and skipped where they do not exist.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import sys

from privileged import seccomp
from privileged.freeze_linux import FIFREEZE, FITHAW
from privileged.seccomp import Allow, AllowIf, Policy, refuse_with

_CHILD_RULES = (
    Allow("the request loop: wait (with a tick, for signals), read a record, answer it",
          ("poll", "ppoll", "recvmsg", "sendto", "sendmsg")),
    Allow("read /proc/self/mountinfo, /sys/dev/block, the state records; list "
          "/proc/self/task; open each mountpoint to freeze it; REOPEN the device node",
          ("openat", "read", "lseek", "close", "fstat", "newfstatat", "getdents64")),
    AllowIf("FIFREEZE and FITHAW, nothing else; any other request fails ENOTTY (an "
            "isatty() probe takes that as 'not a terminal')",
            "ioctl", 1, (FIFREEZE, FITHAW), refuse_with(errno.ENOTTY)),
    Allow("flush each filesystem before freezing it", ("syncfs",)),
    Allow("write, replace and remove the crash and cooldown records in [state] dir",
          ("write", "rename", "renameat", "renameat2", "unlink", "unlinkat")),
    Allow("memory", ("brk", "mmap", "munmap", "mremap", "madvise")),
    Allow("log records carry the pid and the time (clock_gettime when the vDSO cannot)",
          ("getpid", "clock_gettime", "gettimeofday")),
    Allow("signals: return from a handler; the interpreter restores handlers at exit; a "
          "wait interrupted by SIGSTOP resumes through restart_syscall",
          ("rt_sigreturn", "rt_sigaction", "restart_syscall")),
    Allow("exit", ("exit_group",)),
)

# With a real device node the child never makes a socket: no socket(), no connect(), so a
# subverted child cannot reach, as root, a local service's socket (systemd's, D-Bus).
ROOT_CHILD = Policy(
    role="root child",
    rules=_CHILD_RULES,
    default=refuse_with(errno.EPERM),
    wrong_arch=refuse_with(errno.EPERM),
)

# Only when the device is the simulator's Unix socket (--device naming a socket), which
# REOPEN connects to again.
ROOT_CHILD_SIMULATED = Policy(
    role="root child, simulator's socket",
    rules=(*_CHILD_RULES,
           AllowIf("REOPEN of the simulator's socket: Unix sockets only",
                   "socket", 0, (socket.AF_UNIX,), refuse_with(errno.EAFNOSUPPORT)),
           Allow("REOPEN: connect to the simulator's socket", ("connect",))),
    default=refuse_with(errno.EPERM),
    wrong_arch=refuse_with(errno.EPERM),
)


def child_policy(device: str | None) -> Policy:
    """ROOT_CHILD, or ROOT_CHILD_SIMULATED when the device REOPEN names is a Unix socket."""
    try:
        simulated = device is not None and stat.S_ISSOCK(os.stat(device).st_mode)
    except OSError:
        simulated = False  # gone: REOPEN will fail and say so, with or without a socket
    return ROOT_CHILD_SIMULATED if simulated else ROOT_CHILD


def confine_child(device: str | None) -> None:
    """Load the child's filter (Linux); raises seccomp.SandboxError if that is impossible."""
    if sys.platform.startswith("linux"):
        seccomp.confine(child_policy(device), all_threads=True)
