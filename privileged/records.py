"""One record per call on a SOCK_SEQPACKET socket, strictly: the record layer of every link.

What imsg.c is to OpenBSD's daemons: the one place that calls recvmsg and
sendmsg, so that truncation and passed descriptors are handled once, the
same way on every link (the root child's, the parent's end of it, the
frontend's).  Standard library only; works on socket.socket and on the
bare _socket.socket the root child uses.

receive(): one record and the descriptors passed with it.  A record longer
than the caller's limit is cut by the kernel (MSG_TRUNC), and cut ancillary
data (MSG_CTRUNC) may have lost descriptors: both raise RecordError, as do
ancillary data that are not descriptors (credentials) and more descriptors
than the caller allows.  Before it raises, every descriptor that did arrive
is closed, so that a violation never leaves one behind.  Descriptors arrive
close-on-exec (MSG_CMSG_CLOEXEC).  End of file is an empty record: with
SEQPACKET a zero-length record and EOF look the same, so no link ever sends
one.  ECONNRESET says that the peer closed with records of ours unread; the
kernel reports it before the records the peer sent earlier, which are still
queued.  A parent reads those (the child's last answers and log lines); the
root child (drain=False) takes the reset as EOF at once: its parent is gone,
and requests it sent before going must not be acted on.

send(): one record, with descriptors if any.  With block=False (MSG_DONTWAIT)
a full socket buffer returns False instead of waiting: a root child must
never be blocked by a parent that stops reading.  Receivers poll before they
call receive(), so it never waits on a socket without a timeout.
"""

from __future__ import annotations

import _socket
import os
import struct

_SCM = (_socket.SOL_SOCKET, _socket.SCM_RIGHTS)
_CLOEXEC = getattr(_socket, "MSG_CMSG_CLOEXEC", 0)
_SEEN_FDS = 64  # ancillary room to see (and close) this many descriptors, whatever is allowed


class RecordError(Exception):
    """A record or its ancillary data broke the link's rules (one line)."""


def receive(sock: _socket.socket, limit: int, max_fds: int = 0,
            drain: bool = True) -> tuple[bytes, list[int]]:
    """One record of at most `limit` bytes and at most `max_fds` descriptors; b"" at EOF."""
    args = (limit + 1, _socket.CMSG_SPACE(4 * _SEEN_FDS), _CLOEXEC)
    try:
        data, anc, flags, _ = sock.recvmsg(*args)
    except ConnectionResetError:
        if not drain:
            return b"", []
        data, anc, flags, _ = sock.recvmsg(*args)  # the reset is reported once
    fds = [fd for level, kind, raw in anc if (level, kind) == _SCM
           for fd in struct.unpack(f"{len(raw) // 4}i", raw[:len(raw) // 4 * 4])]
    problem = ("an oversized record" if flags & _socket.MSG_TRUNC or len(data) > limit else
               "cut ancillary data" if flags & _socket.MSG_CTRUNC else
               "ancillary data that are not descriptors" if len(anc) > (1 if fds else 0) else
               f"{len(fds)} passed descriptor(s)" if len(fds) > max_fds else "")
    if problem or not data:
        for fd in fds:
            os.close(fd)
        if problem:
            raise RecordError(problem)
        return b"", []
    if not _CLOEXEC:
        for fd in fds:
            os.set_inheritable(fd, False)
    return data, fds


def send(sock: _socket.socket, record: bytes, fds: tuple[int, ...] = (), *,
         block: bool = True) -> bool:
    """Send one record; False if the peer's buffer is full and `block` is false."""
    anc = [(*_SCM, struct.pack(f"{len(fds)}i", *fds))] if fds else []
    try:
        sock.sendmsg([record], anc, 0 if block else _socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    return True
