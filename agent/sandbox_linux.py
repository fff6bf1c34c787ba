"""The unprivileged parent's seccomp filter, one allowlist per role it plays.

The parent's filter is the union of the roles the process plays; today that
is SERVICE, the event loop of agent/service.py and everything it calls.  A
process that takes on more (a thread, a forked frontend) adds a role here
and passes it to confine_parent(); a forked process may stack a narrower
filter of its own on top, never a wider one.  SECCOMP_FILTER_FLAG_TSYNC puts
the filter on every thread the parent already has, so a thread started
before the drop (a log receiver) is covered too.

Anything not listed kills the process: the parent holds no freeze, and its
death is what the root child answers by thawing and exiting (EOF on the
socket), after which the service manager restarts the pair.  Two calls are
answered with an errno instead, because the interpreter may make them and
copes: ioctl other than FIONBIO (an isatty() probe takes ENOTTY as "not a
terminal"; the Linux device is read and written, never ioctl'd) and open
(nothing in the empty chroot can be opened anyway; a traceback's source
lines are read through linecache, which treats the error as "no source").

Measured with strace on the real agent (tools/measure_syscalls.py).
"""

from __future__ import annotations

import errno
import socket

from privileged.seccomp import KILL_PROCESS, Allow, AllowIf, Policy, Refuse, Rule, refuse_with

FIONBIO = 0x5421  # asm-generic/ioctls.h, the same on x86_64 and arm64

SERVICE: tuple[Rule, ...] = (
    Allow("the event loop: the kernel channel, the child's socket, the signal pipe, timers",
          ("poll", "ppoll", "select", "pselect6")),
    Allow("kernel requests and replies (the device: read/write; the simulator: records); "
          "the child's records, and the device descriptor it passes on REOPEN; log lines",
          ("read", "write", "recvfrom", "recvmsg", "sendto")),
    Allow("descriptors: close the old channel on REOPEN, look at the new one (device or "
          "socket?), the signal wake-up pipe; a socket's repr (unclosed-socket warning)",
          ("close", "fstat", "newfstatat", "getsockname", "getsockopt", "getpeername",
           "pipe2", "fcntl")),
    AllowIf("ioctl: FIONBIO only, socket.settimeout() on the child's socket; the Linux "
            "device needs none", "ioctl", 1, (FIONBIO,), refuse_with(errno.ENOTTY)),
    Refuse("open: there is nothing to open in the chroot", ("open", "openat"), errno.EACCES),
    AllowIf("syslog: SysLogHandler reconnects once if its socket fails (inside the chroot "
            "that connect fails, and the record is dropped): Unix sockets only",
            "socket", 0, (socket.AF_UNIX,), refuse_with(errno.EAFNOSUPPORT)),
    Allow("syslog: the reconnect", ("connect",)),
    Allow("signals: handlers for SIGTERM, SIGINT, SIGHUP; a wait interrupted by SIGSTOP "
          "resumes through restart_syscall", ("rt_sigaction", "rt_sigreturn", "restart_syscall")),
    Allow("stopping: wait for the child to exit (Popen.wait polls, and sleeps)",
          ("wait4", "clock_nanosleep")),
    Allow("memory", ("brk", "mmap", "munmap", "mremap", "madvise")),
    Allow("log records carry the pid and the time", ("getpid", "clock_gettime",
                                                      "gettimeofday")),
    Allow("exit", ("exit_group",)),
)

#: Roles a parent process can play.  Issue 6 (the frontend process and the
#: multiprocessing-logging receiver thread) adds its roles here.
ROLES: dict[str, tuple[Rule, ...]] = {
    "service": SERVICE,
}


def parent_policy(roles: tuple[str, ...]) -> Policy:
    """The filter for a process playing `roles`.  A syscall two roles both list must be
    merged by hand into one rule (tests/test_seccomp.py checks there is none)."""
    rules = tuple(rule for role in roles for rule in ROLES[role])
    return Policy(role="parent: " + " + ".join(roles), rules=rules, default=KILL_PROCESS)
