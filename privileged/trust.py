"""Is a path safe for root to read or run?  (OpenSSH's StrictModes, in Python.)

A file root reads or executes must be owned by root and writable by nobody
else, and so must every directory above it: otherwise an unprivileged user
could swap the file (CVE-2020-26880 is that mistake with a config file).
A directory with the sticky bit set (/tmp) may be world-writable, because
nobody but the owner of an entry in it can rename or remove that entry; the
entry itself must then be root's.

"root" is whoever runs the check when that is not root (the unprivileged
demo): a file you own is as trustworthy as you are, and no more.
"""

from __future__ import annotations

import os
import stat

_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def _trusted_owners() -> frozenset[int]:
    return frozenset({0, os.geteuid()})


def untrusted_reason(path: str) -> str | None:
    """None if `path` and all its parents are root-owned and safe, else why not."""
    owners = _trusted_owners()
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        return f"{path}: {e.strerror}"
    if st.st_uid not in owners:
        return f"{path} is owned by uid {st.st_uid}, not root"
    if st.st_mode & _WRITABLE_BY_OTHERS:
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    parent = os.path.dirname(path)
    while True:
        try:
            pst = os.stat(parent)
        except OSError as e:
            return f"{parent}: {e.strerror}"
        if pst.st_uid not in owners:
            return f"directory {parent} is owned by uid {pst.st_uid}, not root"
        if pst.st_mode & _WRITABLE_BY_OTHERS and not pst.st_mode & stat.S_ISVTX:
            mode = stat.S_IMODE(pst.st_mode)
            return f"directory {parent} is writable by group or others (mode {mode:04o})"
        if parent == "/":
            return None
        parent = os.path.dirname(parent)


def untrusted_tree_reason(top: str, skip: frozenset[str] = frozenset()) -> str | None:
    """Like untrusted_reason, for a directory and everything below it but `skip` names."""
    reason = untrusted_reason(top)
    if reason:
        return reason
    owners = _trusted_owners()
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if st.st_uid not in owners:
                return f"{p} is owned by uid {st.st_uid}, not root"
            if st.st_mode & _WRITABLE_BY_OTHERS and not stat.S_ISLNK(st.st_mode):
                return f"{p} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None
