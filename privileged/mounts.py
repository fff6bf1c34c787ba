"""What the root child knows of a mounted filesystem, and of a platform: the types below
both the selection policy (selection.py) and the freezers, so that a freezer never
imports the policy.  No I/O.
"""

from __future__ import annotations

_OCTAL = frozenset("01234567")


class Mount:
    """A mounted filesystem as the root child sees it, on either platform.

    local: not a network filesystem.  pseudo: no backing storage of its own
    (proc, tmpfs, devfs, nullfs ...).  fs_key: the filesystem's identity
    (Linux: the superblock's "maj:min"; FreeBSD: the fsid in hex), shared by
    bind mounts and btrfs subvolumes.  backing_file: for a Linux loop device,
    the file behind it.  mount_id: Linux mountinfo's first field, the kernel's
    id of this mount."""

    def __init__(self, mountpoint: str, fstype: str, source: str, *, readonly: bool,
                 local: bool, pseudo: bool, fs_key: str, backing_file: str | None = None,
                 mount_id: int = 0) -> None:
        self.mountpoint, self.fstype, self.source, self.fs_key = mountpoint, fstype, source, fs_key
        self.readonly, self.local, self.pseudo = readonly, local, pseudo
        self.backing_file, self.mount_id = backing_file, mount_id

    def __repr__(self) -> str:
        return f"Mount({self.mountpoint!r}, {self.fstype!r}, {self.fs_key!r})"


class Platform:
    """What a platform can freeze; the rest of the rules are shared.

    crash_consistent: read-write types left unfrozen by default (FAT), a veto
    in strict mode.  ignored_prefixes: FreeBSD's /dev, on a path boundary.
    strict_vetoes_every_writable: strict mode is the stock hv_vss_daemon's
    rule (pseudo and network filesystems veto too).  freeze_outlives_holder:
    Linux, where the child keeps a crash record (statefile.py); on FreeBSD
    closing the /dev/ufssuspend descriptor resumes, so there is nothing to
    record."""

    def __init__(self, name: str, freezable: frozenset[str], crash_consistent: frozenset[str], *,
                 ignored_prefixes: tuple[str, ...] = (), strict_vetoes_every_writable: bool = False,
                 freeze_outlives_holder: bool = True) -> None:
        self.name, self.freezable, self.crash_consistent = name, freezable, crash_consistent
        self.zfs, self.ignored_prefixes = frozenset({"zfs"}), ignored_prefixes
        self.strict_vetoes_every_writable = strict_vetoes_every_writable
        self.freeze_outlives_holder = freeze_outlives_holder


def escape(path: str) -> str:
    r"""A path as mountinfo writes it: space, tab, newline and backslash as \ooo (the crash
    record writes its paths so too)."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def unescape(field: str) -> str:
    r"""The path mountinfo (or the crash record) wrote as `field`: \ooo is one character."""
    first, *rest = field.split("\\")
    return first + "".join(chr(int(p[:3], 8)) + p[3:] if len(p) >= 3 and set(p[:3]) <= _OCTAL
                           else "\\" + p for p in rest)
