"""FreeBSD's mount table as the root child reads it, and what FreeBSD can freeze.

Only UFS can be suspended (ffs_susp_suspend refuses anything !ffs_own_mount
with EINVAL), matched exactly: the stock daemon's 3-byte compare would also
take any type that merely starts with "ufs".  The stock daemon skips mount
points that start with the four characters "/dev", which skips /devel too;
here /dev is a path, compared on a component boundary.

A network filesystem is one without MNT_LOCAL.  Pseudo filesystems have no
storage of their own to make consistent: tmpfs is memory, nullfs and unionfs
write through to a lower filesystem that is judged on its own, and the rest
are kernel views.  ZFS cannot be suspended ([check] zfs decides); a
read-write msdosfs (an EFI partition) is crash-consistent only in the
default mode.  Anything else read-write and local vetoes: the operator
decides with [freeze] exclude.
"""

from __future__ import annotations

from privileged.mounts import Mount, Platform
from privileged.statfs_freebsd import MNT_LOCAL, MNT_RDONLY, StatfsEntry, decode

PSEUDO = frozenset({
    "devfs", "fdescfs", "procfs", "linprocfs", "linsysfs", "tmpfs", "nullfs", "unionfs",
    "mqueuefs", "autofs",
})

FREEBSD = Platform("freebsd", frozenset({"ufs"}), frozenset({"msdosfs"}),
                   ignored_prefixes=("/dev",), strict_vetoes_every_writable=True,
                   freeze_outlives_holder=False)


def to_mount(e: StatfsEntry) -> Mount:
    pseudo = e.fstypename in PSEUDO
    return Mount(e.mntonname, e.fstypename, e.mntfromname, readonly=bool(e.flags & MNT_RDONLY),
                 local=bool(e.flags & MNT_LOCAL) or pseudo, pseudo=pseudo, fs_key=e.fsid.hex())


def fsid_of(m: Mount) -> bytes:
    """The fsid_t for UFSSUSPEND, from the key to_mount() made of it."""
    fsid = bytes.fromhex(m.fs_key)
    if len(fsid) != 8:
        raise ValueError(f"{m.mountpoint}: {m.fs_key!r} is not an fsid")
    return fsid


def parse_mounts(buf: bytes) -> list[Mount]:
    """getfsstat(2)'s records, in mount order (oldest first)."""
    return [to_mount(e) for e in decode(buf)]
