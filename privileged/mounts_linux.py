"""Linux mount table, read by the root child itself from /proc/self/mountinfo.

mountinfo (proc(5)) rather than /proc/mounts because it carries the
superblock's device number (field 3): bind mounts and btrfs subvolumes of one
filesystem share it, while stat() gives each btrfs subvolume its own st_dev.

Read-only means the superblock's options say so ("ro" after the separator),
not this mount's: systemd's ProtectSystem=strict makes every mount in the
service's namespace read-only while the filesystems stay writable elsewhere,
and a filesystem someone can write to is one to freeze.  FIFREEZE needs no
write access to the mount it is issued on.
"""


from __future__ import annotations

import os
import stat

from privileged.mounts import Mount, Platform, unescape

MOUNTINFO = "/proc/self/mountinfo"
LOOP_MAJOR = 7

# Filesystems whose superblock implements freeze (FIFREEZE would otherwise
# return EOPNOTSUPP).  ext2/ext3 are served by the ext4 driver.
FREEZABLE = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "nilfs2", "reiserfs",
    "gfs2", "ocfs2", "bcachefs",
})
NETWORK = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p", "afs", "ncpfs",
    "fuse.sshfs", "fuse.glusterfs", "lustre", "gpfs", "davfs", "fuse.s3fs", "ocfs2_dlmfs",
})
__all__ = ["LINUX", "MOUNTINFO", "parse_mountinfo", "read", "unescape"]
LINUX = Platform("linux", FREEZABLE, crash_consistent=frozenset({"vfat", "msdos", "exfat"}))


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            mount_id, majmin, mountpoint = int(fields[0]), fields[2], fields[4]
            fstype, source, super_opts = fields[sep + 1], fields[sep + 2], fields[sep + 3]
            major = int(majmin.split(":")[0])
        except (ValueError, IndexError):
            continue  # a line we do not understand is not a line we freeze
        source = unescape(source)
        device = _block_device(source)
        # btrfs (and a few others) report an anonymous device number (major 0): ask the source
        block = os.path.exists(f"/sys/dev/block/{majmin}") if major else device is not None
        mounts.append(Mount(unescape(mountpoint), fstype, source,
                            readonly="ro" in super_opts.split(","),
                            local=fstype not in NETWORK and not fstype.startswith("nfs"),
                            pseudo=not block, fs_key=majmin,
                            backing_file=_loop_backing_file(device) if block else None,
                            mount_id=mount_id))
    return mounts


def _block_device(source: str) -> int | None:
    """The device number of `source` if it is a block device under /dev."""
    try:
        st = os.stat(source) if source.startswith("/dev/") else None
    except OSError:
        return None
    return st.st_rdev if st is not None and stat.S_ISBLK(st.st_mode) else None


def _loop_backing_file(rdev: int | None) -> str | None:
    if rdev is None or os.major(rdev) != LOOP_MAJOR:
        return None
    try:
        path = read(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/loop/backing_file")
    except OSError:
        return None
    return path.rstrip("\n").removesuffix(" (deleted)") or None


def read(path: str) -> str:
    """A small kernel-written file, read with os calls alone (open() would probe it with
    an isatty() ioctl, which the seccomp filter refuses)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return b"".join(iter(lambda: os.read(fd, 1 << 16), b"")).decode("utf-8", "surrogateescape")
    finally:
        os.close(fd)
