"""Is a path safe for root to read?  (OpenSSH's StrictModes, in Python.)

A file root reads or executes must be owned by root and writable by nobody
else, and so must every directory above it: otherwise an unprivileged user
could swap the file (CVE-2020-26880 is that mistake with a config file).
A directory with the sticky bit set (/tmp) may be world-writable, because
nobody but the owner of an entry in it can rename or remove that entry; the
entry itself must then be root's.

Two chains are checked: the path as given (a symlink on it must be root's,
in a safe directory, or whoever can swap it chooses what the path names) and
the path it resolves to (realpath; every directory looked at with lstat), so
a root-owned link into a directory someone else owns is judged by that
directory.  When all of that is safe, nobody but root can change what the
path names, so a check now still holds when the path is opened later;
open_trusted() also checks the opened descriptor itself.

This module is what the root child runs (its config, its state directory);
privileged/trust.py adds the parent's checks of a whole install.

"root" is whoever runs the check when that is not root (the unprivileged
demo): a file you own is as trustworthy as you are, and no more.
"""

from __future__ import annotations

import os
import stat

_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


class Untrusted(Exception):
    """What open_trusted() refused, and why (one line)."""


def object_reason(path: str, st: os.stat_result) -> str | None:
    """Why the object itself (not its directories) is unsafe, or None."""
    if st.st_uid not in (0, os.geteuid()):
        return f"{path} is owned by uid {st.st_uid}, not root"
    if st.st_mode & _WRITABLE_BY_OTHERS and not stat.S_ISLNK(st.st_mode):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def directories_reason(path: str, *, links: bool = False) -> str | None:
    """Why some directory above `path` is unsafe, or None.  `path` is resolved already
    (realpath), unless `links`: then a symlink on the way is judged by its owner, and
    whoever checks the path checks where it leads on its own."""
    owners = (0, os.geteuid())
    parent = os.path.dirname(path)
    while True:
        try:
            st = os.lstat(parent)
        except OSError as e:
            return f"{parent}: {e.strerror}"
        if links and stat.S_ISLNK(st.st_mode):
            if st.st_uid not in owners:
                return f"{parent} is a symlink owned by uid {st.st_uid}, not root"
        elif not stat.S_ISDIR(st.st_mode):
            return f"{parent} is not a directory"  # a link swapped in since realpath()
        elif st.st_uid not in owners:
            return f"directory {parent} is owned by uid {st.st_uid}, not root"
        elif st.st_mode & _WRITABLE_BY_OTHERS and not st.st_mode & stat.S_ISVTX:
            mode = stat.S_IMODE(st.st_mode)
            return f"directory {parent} is writable by group or others (mode {mode:04o})"
        if parent == "/":
            return None
        parent = os.path.dirname(parent)


def open_trusted(path: str, flags: int = os.O_RDONLY) -> int:
    """Open `path` for root; Untrusted says why it is refused, OSError why it cannot be.

    The directories are checked by path (safe: only root could change them), the
    object on the descriptor that will be read, so what is checked is what is used."""
    real = os.path.realpath(path)
    reason = directories_reason(real)
    if reason:
        raise Untrusted(reason)
    fd = os.open(real, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        reason = object_reason(real, os.fstat(fd))
        if reason:
            raise Untrusted(reason)
    except BaseException:
        os.close(fd)
        raise
    return fd
