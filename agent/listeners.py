"""Listening Unix sockets, made by root before the parent confines itself.

After the chroot the parent could neither create nor find these paths, so
they are bound here, with their final owner and mode, and only the open
listening descriptors survive the drop.  A socket file left by a previous
run is replaced only if nobody answers on it (so a second agent cannot steal
a running agent's socket), and never if it is not a socket.  The files stay
after we exit: the unprivileged parent cannot remove them from inside its
chroot, and the next start replaces them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat

from agent.errors import StartupError

BACKLOG = 16


def listen_unix(path: str, mode: int, gid: int = 0, what: str = "socket") -> socket.socket:
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, mode=0o755)
        except OSError as e:
            raise StartupError(f"{what} {path}: cannot create {parent}: {e.strerror}") from None
    _remove_stale(path, what)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # no window in which the file is more open than `mode`
    try:
        sock.bind(path)
        os.chown(path, 0, gid)
        os.chmod(path, mode)
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise StartupError(f"{what} {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    sock.setblocking(False)
    return sock


def _remove_stale(path: str, what: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{what} {path} exists and is not a socket: refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    finally:
        probe.close()
    raise StartupError(f"{what} {path} is in use: is another hv-vss-agent running?")
