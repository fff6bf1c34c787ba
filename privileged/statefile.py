"""The crash record: what the child is about to freeze, kept outside the freeze.

A Linux freeze outlives the process that made it, so a SIGKILLed child would
leave its filesystems frozen.  Before freezing, the child writes the list to
a root-only file in [state] dir (tmpfs /run by default); it removes the file
after thawing.  The next child reads it before anything else and thaws what
it names.  The directory must never be on a filesystem we freeze (selection
makes that a veto), so these writes never block and never land in a snapshot.

Format: one line per filesystem, "<fs_key> <mountpoint>", the mountpoint
escaped as in mountinfo.

The cooldown record: after each thaw of ours, the CLOCK_MONOTONIC time
(shared by every process, reset at boot like /run) before which no FREEZE
is accepted.  The next child honours it, so a parent cannot skip the
cooldown by making its child exit and the service manager restart the pair.

FreeBSD keeps no record (StateDir(enabled=False)): a UFS suspension lasts
only as long as the /dev/ufssuspend descriptor that made it, and the kernel
closes a dead child's descriptors, which resumes its filesystems
(ffs_susp_dtor).  There is nothing a successor could have to thaw, and no
directory to keep off the frozen filesystems ([state] dir is not used).
"""

from __future__ import annotations

import math
import os
import stat

from privileged.mounts_linux import unescape

RECORD = "frozen"
COOLDOWN = "cooldown"


def _escape(path: str) -> str:
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


class StateDir:
    def __init__(self, path: str, enabled: bool = True) -> None:
        self.path = path
        self.record = os.path.join(path, RECORD)
        self.cooldown = os.path.join(path, COOLDOWN)
        self.enabled = enabled

    def ensure(self) -> None:
        if not self.enabled:
            return
        try:
            os.mkdir(self.path, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(self.path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() \
                or stat.S_IMODE(st.st_mode) & 0o077:
            raise OSError(f"state directory {self.path} must be a root-owned directory "
                          f"with mode 0700 (found mode {stat.S_IMODE(st.st_mode):04o}, "
                          f"uid {st.st_uid})")

    def write(self, entries: list[tuple[str, str]]) -> None:
        if self.enabled:
            _replace(self.record, "".join(f"{k} {_escape(p)}\n" for k, p in entries))

    def write_cooldown(self, until: float) -> None:
        if self.enabled:
            _replace(self.cooldown, f"{until:.6f}\n")

    def read_cooldown(self) -> float:
        """The recorded end of the cooldown, 0.0 if there is none or it is unreadable."""
        try:
            until = float(_read(self.cooldown)) if self.enabled else 0.0
        except ValueError:
            return 0.0
        return until if math.isfinite(until) else 0.0

    def clear(self) -> None:
        if not self.enabled:
            return
        try:
            os.unlink(self.record)
        except FileNotFoundError:
            pass

    def read(self) -> list[tuple[str, str]]:
        if not self.enabled:
            return []
        entries = []
        for line in _read(self.record).splitlines():
            key, sep, path = line.partition(" ")
            if sep and path.startswith("/"):
                entries.append((key, unescape(path)))
        return entries


def _replace(path: str, text: str) -> None:
    tmp = path + ".new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)
    os.rename(tmp, path)


def _read(path: str) -> str:
    """A record's text; "" if it is missing, not ours, not a regular file or too big."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return ""
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode) or st.st_size > 1 << 20:
            return ""
        data = os.read(fd, st.st_size)
    finally:
        os.close(fd)
    return data.decode("utf-8", "replace")
