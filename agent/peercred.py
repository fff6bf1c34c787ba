"""Who is on the other end of a Unix socket, as the kernel says (who may talk to us:
agent/allowlist.py).

The kernel records the peer's credentials when it connects; nothing the peer
sends can change them.  Linux: SO_PEERCRED (pid, uid, gid) plus SO_PEERGROUPS
(the supplementary groups, Linux 4.13+).  FreeBSD: LOCAL_PEERCRED returns a
struct xucred with the uid, the groups (the first is the effective gid) and,
since FreeBSD 13, the pid.  getpeereid(3) would give only the uid and gid.
The FreeBSD half is written from <sys/ucred.h> and unix(4) and has not run
on FreeBSD yet.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from agent import platforms

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux <asm-generic/socket.h>
MAX_GROUPS_QUERIED = 256  # Python's getsockopt takes at most 1024 bytes

# FreeBSD <sys/un.h>, <sys/ucred.h>
SOL_LOCAL = 0
LOCAL_PEERCRED = 1
XUCRED_VERSION = 0
XU_NGROUPS = 16
XUCRED = struct.Struct(f"<IIh2x{XU_NGROUPS}I4xQ")  # amd64 layout: the union holds a pointer


@dataclass(frozen=True, slots=True)
class PeerCred:
    uid: int
    gid: int
    groups: frozenset[int]
    pid: int  # 0 when the platform does not say


def _linux(sock: socket.socket) -> PeerCred:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * MAX_GROUPS_QUERIED)
        groups = frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:
        groups = frozenset()  # ERANGE (more groups than we ask for) or an old kernel
    return PeerCred(uid, gid, groups | {gid}, pid)


def _freebsd(sock: socket.socket) -> PeerCred:
    raw = sock.getsockopt(SOL_LOCAL, LOCAL_PEERCRED, XUCRED.size)
    version, uid, ngroups, *rest = XUCRED.unpack(raw[:XUCRED.size].ljust(XUCRED.size, b"\0"))
    if version != XUCRED_VERSION or not 1 <= ngroups <= XU_NGROUPS:
        raise OSError("unexpected struct xucred")
    groups = rest[:ngroups]
    return PeerCred(uid, groups[0], frozenset(groups), rest[XU_NGROUPS] & 0xFFFFFFFF)


def peer_credentials(sock: socket.socket) -> PeerCred:
    """The connecting process's credentials.  Raises OSError if the kernel will not say."""
    if platforms.freebsd():
        return _freebsd(sock)
    return _linux(sock)


def describe(cred: PeerCred) -> str:
    """For log lines: names if we still can (before the chroot), numbers always."""
    return f"uid {cred.uid} gid {cred.gid} pid {cred.pid}"
