"""The unprivileged parent's seccomp filter, one allowlist per role it plays.

The parent's filter is the union of the roles the process plays (ROLES,
picked from the config by agent.sandbox.parent_roles): SERVICE, the event
loop of agent/engine/service.py and everything it calls; FRONTEND_LINK when it runs
a frontend; METRICS when it writes the metrics file.  A new duty is a new
role here, measured with `make syscalls`.  SECCOMP_FILTER_FLAG_TSYNC puts the
filter on every thread the parent already has (multiprocessing-logging's
receiver).  The frontend process, forked before the parent loads
its filter, loads its own: FRONTEND, at the end of this file.

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
import os
import socket

from privileged.seccomp import (
    KILL_PROCESS,
    Allow,
    AllowIf,
    AllowIfClear,
    Policy,
    Refuse,
    Rule,
    refuse_with,
)

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

# The exact flags glibc's pthread_create passes to clone (sysdeps/unix/sysv/linux/
# createthread.c): CLONE_VM FS FILES SIGHAND THREAD SYSVSEM SETTLS PARENT_SETTID
# CHILD_CLEARTID.  clone3 takes its flags through a pointer the filter cannot read,
# so it is refused with ENOSYS and glibc falls back to clone, where they are an
# argument: a thread may start, a process may not.
THREAD_CLONE_FLAGS = 0x3D0F00

THREADS: tuple[Rule, ...] = (
    Refuse("clone3: its flags are out of the filter's sight; glibc then uses clone",
           ("clone3",), errno.ENOSYS),
    AllowIf("clone: a thread (glibc's flags exactly), never a process", "clone", 0,
            (THREAD_CLONE_FLAGS,), KILL_PROCESS),
    Allow("a new thread's set-up and end", ("set_robust_list", "rseq", "rt_sigprocmask",
                                            "gettid", "mprotect", "exit")),
)

# The engine's side of issue 6's frontend: its link (records over a socketpair:
# SERVICE's recvmsg/sendto), its process, and multiprocessing-logging's receiver
# thread, which exists before the filter is loaded (hence TSYNC; no thread is
# started after it: the engine never puts a record on the queue, so the queue's
# feeder thread never starts here).
FRONTEND_LINK: tuple[Rule, ...] = (
    Allow("multiprocessing-logging's threads: the queue's locks and semaphores, their "
          "signal masks, a thread ending at exit", ("futex", "rt_sigprocmask", "exit")),
    Allow("ending a frontend that does not exit when its link closes (FrontendLink.close)",
          ("kill",)),
)

# [metrics] dir: the textfile, written through a directory descriptor taken before
# the chroot.  Only that one way of opening (create or truncate, write-only, no
# symlink followed): nothing can be opened for reading, whatever the path.
METRICS_OPEN = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
METRICS: tuple[Rule, ...] = (
    AllowIf("the metrics file's temporary copy: only these open flags", "openat", 2,
            (METRICS_OPEN,), refuse_with(errno.EACCES)),
    Allow("its mode, whatever the umask, and its rename into place",
          ("fchmod", "renameat", "renameat2")),
)

#: Roles a parent process can play; agent.sandbox.parent_roles() picks them from the config.
ROLES: dict[str, tuple[Rule, ...]] = {
    "service": SERVICE,
    "frontend": FRONTEND_LINK,
    "metrics": METRICS,
}

# The frontend process (agent/frontend/main.py) loads its own filter once it has let
# go of what it inherited: it talks to untrusted local clients.  Its calls were
# measured like the others' (tools/measure_syscalls.py, scene "frontend").
FRONTEND = Policy(role="frontend", default=KILL_PROCESS, rules=(
    Allow("its loop: the listening sockets, the clients, the engine's link",
          ("poll", "ppoll", "accept4", "recvfrom", "sendto", "close")),
    Allow("who a peer is (SO_PEERCRED, SO_PEERGROUPS) and Python's socket objects for them",
          ("getsockopt", "getsockname", "getpeername")),
    AllowIf("ioctl: FIONBIO only (setblocking)", "ioctl", 1, (FIONBIO,),
            refuse_with(errno.ENOTTY)),
    Refuse("open: there is nothing to open in the chroot", ("open", "openat"), errno.EACCES),
    Allow("its log records, through multiprocessing-logging's queue: a pipe and a lock",
          ("write", "futex", "getpid")),
    *THREADS,  # the queue's feeder thread starts with the first record, after the filter
    Allow("signals: a wait interrupted by SIGSTOP resumes through restart_syscall",
          ("rt_sigreturn", "rt_sigaction", "restart_syscall")),
    Allow("memory", ("brk", "mmap", "munmap", "mremap", "madvise")),
    Allow("the time, when the vDSO cannot", ("clock_gettime", "gettimeofday")),
    Allow("exit", ("exit_group",)),
))


def parent_policy(roles: tuple[str, ...]) -> Policy:
    """The filter for a process playing `roles`: what any of them allows is allowed.

    Per syscall the strongest rule wins: Allow over AllowIf over Refuse, and two
    AllowIf on the same argument allow the values of both."""
    chosen: dict[str, Rule] = {}
    for rule in (r for role in roles for r in ROLES[role]):
        if isinstance(rule, AllowIfClear):
            raise TypeError("the parent's roles do not merge AllowIfClear rules")
        for name in [rule.name] if isinstance(rule, AllowIf) else rule.names:
            chosen[name] = _stronger(chosen.get(name), rule, name)
    rules: list[Rule] = []
    for rule in (r for role in roles for r in ROLES[role]):
        if isinstance(rule, AllowIf | AllowIfClear):
            if chosen.get(rule.name) is not None and _kind(chosen[rule.name]) == 1:
                rules.append(chosen.pop(rule.name))
            continue
        mine = tuple(n for n in rule.names if chosen.get(n) is rule)
        for n in mine:
            del chosen[n]
        if mine:
            rules.append(Allow(rule.why, mine) if isinstance(rule, Allow)
                         else Refuse(rule.why, mine, rule.errno))
    return Policy(role="parent: " + " + ".join(roles), rules=tuple(rules), default=KILL_PROCESS)


def _kind(rule: Rule) -> int:
    return 2 if isinstance(rule, Allow) else 1 if isinstance(rule, AllowIf) else 0


def _stronger(old: Rule | None, new: Rule, name: str) -> Rule:
    if old is None or _kind(new) > _kind(old):
        return new
    if isinstance(old, AllowIf) and isinstance(new, AllowIf) and old.arg == new.arg:
        return AllowIf(old.why + "; " + new.why, name, old.arg,
                       old.values + tuple(v for v in new.values if v not in old.values),
                       old.otherwise)
    return old
