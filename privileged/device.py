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

import errno
import os
import socket
import stat
import sys

Identity = tuple[str, int, int]  # ("chr", rdev, 0) or ("sock", st_dev, st_ino)

_LINUX = sys.platform.startswith("linux")


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
    if not _LINUX:
        return _open_then_check(path, expect)
    handle = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(handle)
        found = identity(st)
        if expect is not None and found != expect:
            raise OSError(errno.ESTALE, f"{path} is not the device it was at start-up")
        same_inode = f"/proc/self/fd/{handle}"
        if found[0] == "sock":
            return _connect(same_inode)
        return os.open(same_inode, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
    finally:
        os.close(handle)


def _connect(path: str) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
    except BaseException:
        s.close()
        raise
    return s.detach()


def _open_then_check(path: str, expect: Identity | None) -> int:
    st = os.lstat(path)
    if stat.S_ISSOCK(st.st_mode):
        if expect is not None and identity(st) != expect:
            raise OSError(errno.ESTALE, f"{path} is not the device it was at start-up")
        return _connect(path)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        found = identity(os.fstat(fd))
        if found[0] != "chr" or (expect is not None and found != expect):
            raise OSError(errno.ESTALE, f"{path} is not the device it was at start-up")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
