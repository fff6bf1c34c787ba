"""The parent's checks of what root will run or read: paths as given, and whole trees.

Built on privileged/safe_path.py (the rules, and what the root child runs
itself); used by the install check (agent/integrity.py) and for sockets and
the device.  Never loaded by the root child.
"""

from __future__ import annotations

import os
import stat

from privileged.safe_path import Untrusted, directories_reason, object_reason, open_trusted

__all__ = ["Untrusted", "directories_reason", "object_reason", "open_trusted",
           "untrusted_reason", "untrusted_tree_reason"]


def untrusted_reason(path: str) -> str | None:
    """None if `path` and all its parents are root-owned and safe, else why not: both the
    path as given (whoever can swap a symlink on it chooses what it names) and where it
    leads."""
    given = os.path.abspath(path)
    real = os.path.realpath(given)
    try:
        reason = object_reason(real, os.lstat(real)) or directories_reason(real)
        if reason is None and given != real:
            reason = object_reason(given, os.lstat(given)) or \
                directories_reason(given, links=True)
    except OSError as e:
        return f"{path}: {e.strerror}"
    return reason


def untrusted_tree_reason(top: str, skip: frozenset[str] = frozenset()) -> str | None:
    """Like untrusted_reason, for a directory and everything below it but `skip` names."""
    reason = untrusted_reason(top)
    if reason:
        return reason
    for dirpath, dirnames, filenames in os.walk(os.path.realpath(top)):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            # A link is judged by what it leads to, and everything above that.
            reason = untrusted_reason(p) if stat.S_ISLNK(st.st_mode) else object_reason(p, st)
            if reason:
                return reason
    return None
