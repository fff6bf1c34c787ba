"""Open the kernel VSS device, or connect to the simulator standing in for it.

Root opens it once at start-up; after that only the child can open it again
(the node is root-only), on a REOPEN request that carries no argument: the
path is the one root put on the child's command line.  As with dhcpleased's
main process opening bpf for its engine, the unprivileged side gets a
descriptor, never the right to choose what is opened.

What is opened is what was checked: on Linux the path is first opened with
O_PATH | O_NOFOLLOW (no device's open routine runs, no symlink is followed),
that descriptor is fstat'ed, and only then is the very same inode opened for
real through /proc/self/fd (or, for the simulator's socket, connected to
through it).  The child records what the device was at start-up (the
character device's number, or the socket's inode) and a REOPEN that finds
anything else is refused.  Elsewhere, where O_PATH or /proc may be missing,
the node is opened with O_NOFOLLOW | O_NONBLOCK and checked after the open.
"""


from __future__ import annotations

import _socket
import errno
import os
import stat

from privileged.system import LINUX

Identity = tuple[str, int, int]  # ("chr", rdev, 0) or ("sock", st_dev, st_ino)


def identity(st: os.stat_result) -> Identity:
    if stat.S_ISCHR(st.st_mode):
        return ("chr", st.st_rdev, 0)
    if stat.S_ISSOCK(st.st_mode):
        return ("sock", st.st_dev, st.st_ino)
    raise OSError(errno.ENODEV, "neither a character device nor a Unix socket")


def identify(path: str) -> Identity:
    """What `path` is now, not following a symlink."""
    return identity(os.lstat(path))


def open_device(path: str, expect: Identity | None = None) -> int:
    """A close-on-exec descriptor for `path`: the character device, or a SOCK_SEQPACKET
    connection when `path` is a Unix socket (the simulator).  With `expect`, anything
    but that device or socket is refused (ESTALE)."""
    handle = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC) if LINUX else -1
    try:
        found = identity(os.fstat(handle) if LINUX else os.lstat(path))
        if expect is not None and found != expect:
            raise OSError(errno.ESTALE, f"{path} is not the device it was at start-up")
        same = f"/proc/self/fd/{handle}" if LINUX else path  # Linux: the inode just checked
        if found[0] == "sock":
            s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
            try:
                s.connect(same)
            except BaseException:
                s.close()
                raise
            return s.detach()
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY
        fd = os.open(same, flags if LINUX else flags | os.O_NOFOLLOW | os.O_NONBLOCK)
    finally:
        if LINUX:
            os.close(handle)
    if not LINUX:  # opened by path: what the open reached is checked now
        try:
            if identity(os.fstat(fd)) != found:
                raise OSError(errno.ESTALE, f"{path} is not the device it was at start-up")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
    return fd
