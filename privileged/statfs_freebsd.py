"""FreeBSD's struct statfs (sys/sys/mount.h, FreeBSD 12 and later), decoded; no I/O.

The layout is the ino64 one (STATFS_VERSION 0x20140518): fixed-width fields,
naturally aligned, 2344 bytes on amd64.  Every field has a fixed width, so
the layout is the same on every architecture [inference, not checked on one].
The older FREEBSD11_STATFS_VERSION (0x20030518) had 88-byte names; a record
of any other version is refused rather than guessed at, because a wrong
offset would hand UFSSUSPEND the wrong fsid.

f_fsid is what UFSSUSPEND takes.  The kernel zeroes it for callers without
PRIV_VFS_GENERATION (kern_getfsstat, kern_do_statfs in vfs_syscalls.c), so
only the root child ever sees it; an all-zero fsid on a UFS mount means the
caller was not privileged, and is refused too.
"""

from __future__ import annotations

import struct

STATFS_VERSION = 0x20140518  # the only one read (the older 0x20030518 is refused)
MNT_RDONLY, MNT_LOCAL = 0x1, 0x1000
MNT_NOWAIT = 2

# f_version f_type f_flags f_bsize f_iosize f_blocks f_bfree f_bavail f_files f_ffree
# f_syncwrites f_asyncwrites f_syncreads f_asyncreads f_nvnodelistsize f_spare0
# f_spare[9] f_namemax f_owner f_fsid f_charspare f_fstypename f_mntfromname f_mntonname
# (names: MFSNAMELEN 16, MNAMELEN 1024; f_fsid at offset 192, the names at 280, 296, 1320)
STATFS = struct.Struct("<IIQQQQQqQqQQQQII9QII8s80s16s1024s1024s")
STATFS_SIZE = STATFS.size  # 2344


class StatfsError(OSError):
    """The mount table is not one we can read safely: refuse, do not guess."""


class StatfsEntry:
    """The fields of one struct statfs the child uses; fsid: fsid_t, 8 bytes as given."""

    def __init__(self, flags: int, fsid: bytes, fstypename: str, mntfromname: str,
                 mntonname: str) -> None:
        self.flags, self.fsid, self.fstypename = flags, fsid, fstypename
        self.mntfromname, self.mntonname = mntfromname, mntonname


def _cstring(field: bytes) -> str:
    # Mount paths are bytes to the kernel; keep undecodable ones reversible.
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def decode(buf: bytes) -> list[StatfsEntry]:
    """The records getfsstat(2) filled in, in the kernel's (mount) order."""
    if len(buf) % STATFS_SIZE:
        raise StatfsError(f"getfsstat returned {len(buf)} bytes, not a whole number of "
                          f"{STATFS_SIZE}-byte struct statfs records")
    entries = []
    for (version, _type, flags, *_counts, fsid, _spare, fstype, mntfrom,
         mnton) in STATFS.iter_unpack(buf):
        if version != STATFS_VERSION:
            raise StatfsError(
                f"struct statfs version 0x{version:08x}, expected 0x{STATFS_VERSION:08x} "
                "(FreeBSD 12 or later): refusing to read the mount table with the wrong layout")
        entry = StatfsEntry(flags, fsid, _cstring(fstype), _cstring(mntfrom), _cstring(mnton))
        if entry.fstypename == "ufs" and not any(fsid):
            raise StatfsError(f"{entry.mntonname}: fsid is zero: the kernel hides fsids from "
                              "callers without PRIV_VFS_GENERATION (not running as root?)")
        entries.append(entry)
    return entries
