"""Listening Unix sockets, made by root before the parent confines itself.

After the chroot the parent could neither create nor find these paths, so
they are bound here, with their final owner, mode and ACL, and only the open
listening descriptors survive the drop.

Who may connect is decided by the kernel first: connect(2) needs write
permission on the socket file.  The file is root's, mode 0600, or 0660 with
the one group allowed in; a [notify] allowlist with users or several groups
becomes a POSIX ACL (Linux: the `system.posix_acl_access` xattr, written
here in the kernel's own format).  Nobody else can even queue a connection,
so nobody else can fill the listen queue.  The frontend checks the peer's
credentials again on every connection (agent/frontend/main.py).

Nothing is ever changed by a path that someone else could redirect:

  - the socket's directory must be root's and writable by nobody else, and
    so must every directory above it (privileged.trust), or start-up stops:
    in a directory someone else can write, they could swap the path for a
    symbolic link between bind() and anything done to the path afterwards;
  - the mode comes from the umask at bind(), never from chmod;
  - the socket is bound in a private directory (0700, root, made for it),
    where its group and ACL are set without following a link, listening
    starts, and only then is it renamed to its path: it appears finished,
    atomically replacing a socket left by a previous run.

fchmod()/fchown() on the socket's descriptor would not do: on Linux they
change the socket's own inode, not the file that connect() checks.

A socket file left by a previous run is replaced only if nobody answers on
it (so a second agent cannot steal a running agent's socket), and never if
it is not a socket.  The files stay after we exit: the unprivileged parent
cannot remove them from inside its chroot, and the next start replaces them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import struct
import tempfile
from dataclasses import dataclass

from agent import platforms
from agent.allowlist import Allowlist
from agent.errors import StartupError
from privileged.trust import untrusted_reason

log = logging.getLogger("hv-vss-agent")

# Room for connections the frontend has not accepted yet.  Only root and the
# allowlisted can queue one (the kernel refuses everyone else at connect()).
BACKLOG = 64

# <linux/posix_acl_xattr.h>, <linux/posix_acl.h>
ACL_XATTR = "system.posix_acl_access"
ACL_XATTR_VERSION = 2
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20)
ACL_UNDEFINED_ID = 0xFFFFFFFF
RW = 0o6  # connect() needs write; read is what `ls -l` users expect beside it
_ENTRY = struct.Struct("<HHI")


@dataclass(frozen=True)
class Access:
    """Who the kernel lets connect: root always; `group` by the file's group (0660);
    `users` and `groups` by a POSIX ACL."""

    group: int | None = None
    users: frozenset[int] = frozenset()
    groups: frozenset[int] = frozenset()

    @classmethod
    def for_allowlist(cls, allow: Allowlist) -> Access:
        """One group and no users needs no ACL (and works on any filesystem)."""
        uids = allow.uids - {0}
        if not uids and len(allow.gids) <= 1:
            return cls(group=min(allow.gids, default=None))
        return cls(users=frozenset(uids), groups=allow.gids)

    @property
    def mode(self) -> int:
        return 0o660 if self.group is not None else 0o600

    @property
    def needs_acl(self) -> bool:
        return bool(self.users or self.groups)

    def acl(self) -> bytes:
        """The ACL as the kernel stores it: entries sorted by tag, then by id."""
        entries = [(ACL_USER_OBJ, RW, ACL_UNDEFINED_ID)]
        entries += [(ACL_USER, RW, uid) for uid in sorted(self.users)]
        entries += [(ACL_GROUP_OBJ, 0, ACL_UNDEFINED_ID)]
        entries += [(ACL_GROUP, RW, gid) for gid in sorted(self.groups)]
        entries += [(ACL_MASK, RW, ACL_UNDEFINED_ID), (ACL_OTHER, 0, ACL_UNDEFINED_ID)]
        return struct.pack("<I", ACL_XATTR_VERSION) + b"".join(_ENTRY.pack(*e)
                                                               for e in entries)


def listen_unix(path: str, access: Access, what: str = "socket") -> socket.socket:
    if access.needs_acl and not platforms.linux():
        raise StartupError(f"{what} {path}: letting several users or groups in needs POSIX "
                           "ACLs, which the agent sets on Linux only: allow one group and no "
                           "users")
    directory = trusted_directory(path, what)
    final = os.path.join(directory, os.path.basename(path))
    _check_stale(final, what)
    if access != Access():
        _warn_if_unreachable(directory, path, what)
    try:
        private = tempfile.mkdtemp(prefix=".hv-vss-agent-", dir=directory)  # 0700, root's
    except OSError as e:
        raise StartupError(f"{what} {path}: cannot create a directory in {directory}: "
                           f"{e.strerror}") from None
    staged = os.path.join(private, "socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old = os.umask(0o777 & ~access.mode)
        try:
            sock.bind(staged)
        finally:
            os.umask(old)
        if access.group is not None:
            os.chown(staged, 0, access.group, follow_symlinks=False)
        if access.needs_acl:
            _set_acl(staged, access, path, what)
        sock.listen(BACKLOG)
        os.rename(staged, final)
    except OSError as e:
        sock.close()
        raise StartupError(f"{what} {path}: {e.strerror}") from None
    except BaseException:
        sock.close()
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(staged)  # only if the rename did not happen
        with contextlib.suppress(OSError):
            os.rmdir(private)
    sock.setblocking(False)
    return sock


def trusted_directory(path: str, what: str) -> str:
    """The socket's directory, made if missing, once it and every directory above it
    are root's and writable by nobody else; resolved, so nothing can redirect it."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        _make_directory(directory, path, what)
    reason = untrusted_reason(directory)
    if reason:
        raise StartupError(f"{what} {path}: refusing a directory others could change: "
                           f"{reason}")
    return os.path.realpath(directory)


def _make_directory(directory: str, path: str, what: str) -> None:
    existing = directory
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    reason = untrusted_reason(existing)
    if reason:  # refused before anything is created in it
        raise StartupError(f"{what} {path}: refusing a directory others could change: "
                           f"{reason}")
    old = os.umask(0o022)  # clients must be able to pass through, whatever our umask
    try:
        os.makedirs(directory, mode=0o755)
    except OSError as e:
        raise StartupError(f"{what} {path}: cannot create {directory}: {e.strerror}") from None
    finally:
        os.umask(old)


def _warn_if_unreachable(directory: str, path: str, what: str) -> None:
    """Clients need search permission on every directory above the socket."""
    d = directory
    while True:
        mode = stat.S_IMODE(os.stat(d).st_mode)
        if not mode & stat.S_IXOTH:
            log.warning("%s %s: directory %s (mode %04o) does not let others pass: only "
                        "root, or whoever that directory lets in, can reach the socket",
                        what, path, d, mode)
            return
        if d == "/":
            return
        d = os.path.dirname(d)


def _set_acl(staged: str, access: Access, path: str, what: str) -> None:
    try:
        os.setxattr(staged, ACL_XATTR, access.acl(), follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
            raise StartupError(
                f"{what} {path}: its filesystem does not support POSIX ACLs, which let "
                "[notify] allow_users and allow_groups in and nobody else: put the socket on "
                "one that does (tmpfs, ext4, xfs, btrfs), or allow one group and no users"
            ) from None
        raise


def _check_stale(path: str, what: str) -> None:
    """A socket left by a previous run may be replaced; anything else may not."""
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
    except BlockingIOError:
        pass  # its listen queue is full: someone is listening
    except OSError:
        return
    finally:
        probe.close()
    raise StartupError(f"{what} {path} is in use: is another hv-vss-agent running?")
