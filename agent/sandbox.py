"""The unprivileged parent's sandbox (see SECURITY.md, "The parent").

Installed right after the privilege drop (agent/engine/daemon.py), once everything
is imported and opened: core dumps off, then the platform's sandbox, seccomp
on Linux (agent/sandbox_linux.py), Capsicum on FreeBSD
(agent/sandbox_freebsd.py).  A sandbox that cannot be installed stops
start-up: running unconfined would quietly void what SECURITY.md promises.
"""

from __future__ import annotations

import ctypes
import resource

from agent import platforms, sandbox_freebsd, sandbox_linux
from privileged import seccomp
from privileged.seccomp import SandboxError

PR_SET_DUMPABLE = 4

_capsicum: list[sandbox_freebsd.LibcCapsicum] = []

__all__ = ["SandboxError", "confine_frontend", "confine_parent", "limit_device", "parent_roles"]


def no_core_dumps() -> None:
    """No core file, and (Linux) no ptrace or /proc/<pid>/mem by our own uid either."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if platforms.linux():
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, ctypes.c_ulong(0), 0, 0, 0) != 0:
            raise SandboxError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def parent_roles(*, frontend: bool, metrics: bool) -> tuple[str, ...]:
    """The roles of agent/sandbox_linux.py the parent plays with this configuration."""
    return ("service", *(("frontend",) if frontend else ()), *(("metrics",) if metrics else ()))


def confine_parent(device_fd: int, roles: tuple[str, ...] = ("service",)) -> None:
    no_core_dumps()
    if platforms.linux():
        seccomp.confine(sandbox_linux.parent_policy(roles), all_threads=True)
    elif platforms.freebsd():
        _capsicum.append(sandbox_freebsd.LibcCapsicum())  # libc resolved before cap_enter
        sandbox_freebsd.enter_capability_mode(device_fd, _capsicum[0])


def confine_frontend() -> None:
    """The frontend process, once it holds only its sockets (Linux; FreeBSD: see SECURITY.md).
    It was forked before the parent confined itself: it does both steps itself."""
    no_core_dumps()
    if platforms.linux():
        seccomp.confine(sandbox_linux.FRONTEND, all_threads=True)


def limit_device(fd: int) -> None:
    """A device descriptor that arrived after confine_parent() (REOPEN) gets the same
    limits as the first (FreeBSD; seccomp on Linux is per process, not per descriptor)."""
    if _capsicum:
        sandbox_freebsd.limit_device(fd, _capsicum[0])
