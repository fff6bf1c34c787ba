"""The root child's confinement (see SECURITY.md, "The root child").

Linux, in this order, after start-up work (config read, state files opened,
crash recovery, libc resolved) and before the first request is read:
capabilities (privileged/hardening.py, done first of all by main()),
Landlock (privileged/landlock.py), then this seccomp filter.  On FreeBSD the
child must open /dev/ufssuspend once per filesystem at FREEZE time, which
Capsicum's capability mode forbids (see SECURITY.md, "Known limits").

Every refusal is an errno, never a kill: a root child killed while it holds
freezes would leave them frozen (a Linux freeze outlives its process), while
a refused call is an OSError that every path of the child answers by thawing.

Opening: openat only, its flags checked: never for writing or creating.  The
state files were opened at start-up and are written through those
descriptors, so nothing creates, renames or removes a file.  With Landlock in
force, read-write opens are let through to it (it allows one file: the device
node, for REOPEN); without Landlock they are refused here, and so is REOPEN
of a real device node.  openat2, whose flags seccomp cannot see, is refused.
Processes: none.  The thaw guard was forked before this filter (it installs
the same one on itself), so no clone that makes a process is let through;
wait4 reaps the guard on the way out.  Threads: during a FREEZE or THAW
only, worker threads that freeze or thaw independent filesystems at once
(privileged/concurrent.py): clone with glibc's pthread_create flags exactly,
clone3 refused with ENOSYS (its flags are behind a pointer the filter cannot
read; glibc then falls back to clone), and what a thread needs to start and
end.  Every other clone is refused.

The syscalls below were measured with strace on the real agent driven by the
simulator (tools/measure_syscalls.py): CHECK, FREEZE, THAW, the watchdog,
REOPEN, a signal, QUIT.  Names another architecture or glibc version uses for
the same operation are listed with them and skipped where they do not exist.
"""

from __future__ import annotations

import _socket
import errno
import os
import stat

from privileged import landlock, seccomp
from privileged.freeze_linux import FIFREEZE, FITHAW
from privileged.seccomp import Allow, AllowIf, AllowIfClear, Policy, Refuse, Rule, refuse_with

PROT_EXEC = 0x4
O_TMPFILE_BIT = 0o20000000  # __O_TMPFILE; O_TMPFILE adds O_DIRECTORY
NEVER_OPEN = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | O_TMPFILE_BIT
# glibc's pthread_create (sysdeps/unix/sysv/linux/createthread.c): CLONE_VM FS FILES
# SIGHAND THREAD SYSVSEM SETTLS PARENT_SETTID CHILD_CLEARTID.
THREAD_FLAGS = 0x3D0F00

_COMMON: tuple[Rule, ...] = (
    Allow("the request loop: wait (with a tick, for signals), read a record, answer it",
          ("poll", "ppoll", "recvmsg", "sendto", "sendmsg")),
    Allow("read /proc/self/mountinfo and fdinfo, /sys/dev/block; list /proc/self/task; "
          "walk to each mountpoint; close what it opened",
          ("read", "lseek", "close", "fstat", "newfstatat", "getdents64")),
    AllowIf("FIFREEZE and FITHAW, nothing else; any other request fails ENOTTY (an "
            "isatty() probe takes that as 'not a terminal')",
            "ioctl", 1, (FIFREEZE, FITHAW), refuse_with(errno.ENOTTY)),
    Allow("flush each filesystem before freezing it", ("syncfs",)),
    Allow("the state files (opened at start-up)", ("write", "pwrite64", "ftruncate")),
    AllowIf("FREEZE's and THAW's worker threads (glibc's pthread_create flags exactly); "
            "no process (the thaw guard was forked before this filter)",
            "clone", 0, (THREAD_FLAGS,), refuse_with(errno.EPERM)),
    Refuse("clone3: its flags are out of the filter's sight; glibc then uses clone",
           ("clone3",), errno.ENOSYS),
    Allow("a worker thread's start and end: robust futex list, restartable sequences, "
          "signal mask, the locks it waits on, its exit",
          ("set_robust_list", "rseq", "rt_sigprocmask", "gettid", "futex", "exit")),
    AllowIfClear("a worker thread's stack made readable and writable past its guard page; "
                 "never executable", "mprotect", 2, PROT_EXEC, refuse_with(errno.EPERM)),
    Allow("reaping the thaw guard on the way out", ("wait4",)),
    Allow("memory", ("brk", "mmap", "munmap", "mremap", "madvise")),
    Allow("log records carry the pid and the time (clock_gettime when the vDSO cannot)",
          ("getpid", "clock_gettime", "gettimeofday")),
    Allow("signals: return from a handler; the interpreter restores handlers at exit; a "
          "wait interrupted by SIGSTOP resumes through restart_syscall",
          ("rt_sigreturn", "rt_sigaction", "restart_syscall")),
    Allow("exit", ("exit_group",)),
)

_READ_ONLY = AllowIfClear("open read-only: never to write, create or truncate",
                          "openat", 2, NEVER_OPEN | os.O_RDWR, refuse_with(errno.EPERM))
_READ_WRITE = AllowIfClear("open read-only, or read-write where Landlock allows it (the device "
                           "node, for REOPEN): never to create, truncate or append",
                           "openat", 2, NEVER_OPEN, refuse_with(errno.EPERM))
_SOCKET = (AllowIf("REOPEN of the simulator's socket: Unix sockets only",
                   "socket", 0, (_socket.AF_UNIX,), refuse_with(errno.EAFNOSUPPORT)),
           Allow("REOPEN: connect to the simulator's socket", ("connect",)))


def child_policy(*, simulated: bool, landlock: bool) -> Policy:
    """The child's filter: sockets only when its device is the simulator's Unix socket,
    read-write opens only when Landlock confines them."""
    rules = (*_COMMON, _READ_WRITE if landlock else _READ_ONLY, *(_SOCKET if simulated else ()))
    role = "root child" + (", Landlock" if landlock else "") + (
        ", simulator's socket" if simulated else "")
    return Policy(role=role, rules=rules, default=refuse_with(errno.EPERM),
                  wrong_arch=refuse_with(errno.EPERM))


def is_simulator(device: str | None) -> bool:
    """Is the device REOPEN opens a Unix socket (the simulator), not a device node?"""
    try:
        return device is not None and stat.S_ISSOCK(os.lstat(device).st_mode)
    except OSError:
        return False  # gone: REOPEN will fail and say so, with or without a socket


def confine_child(device: str | None) -> str:
    """Landlock, then the seccomp filter; what is in force, for the log.  Raises OSError
    (seccomp.SandboxError) if the filter cannot be loaded."""
    abi = landlock.restrict(device)
    seccomp.confine(child_policy(simulated=is_simulator(device), landlock=abi > 0),
                    all_threads=True)
    if abi:
        return f"Landlock ABI {abi} and seccomp"
    return "seccomp alone (no Landlock here: read-write opens are refused, and so is REOPEN " \
           "of a device node)"
