"""Open the kernel VSS device, or connect to the simulator standing in for it.

Root opens it once at start-up; after that only the child can open it again
(the node is root-only), on a REOPEN request that carries no argument: the
path is the one root put on the child's command line.  As with dhcpleased's
main process opening bpf for its engine, the unprivileged side gets a
descriptor, never the right to choose what is opened.
"""

from __future__ import annotations

import os
import socket
import stat


def open_device(path: str) -> int:
    """A close-on-exec descriptor for `path`: the character device, or a
    SOCK_SEQPACKET connection when `path` is a Unix socket (the simulator)."""
    st = os.stat(path)
    if stat.S_ISSOCK(st.st_mode):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            s.connect(path)
        except BaseException:
            s.close()
            raise
        return s.detach()
    if not stat.S_ISCHR(st.st_mode):
        raise OSError(f"{path} is neither a character device nor a Unix socket")
    return os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
