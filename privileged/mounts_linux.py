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

from privileged.selection import Mount, Platform

MOUNTINFO = "/proc/self/mountinfo"
# An explicit buffer size: open() then skips its isatty() probe, an ioctl
# (TCGETS) that the child's seccomp filter refuses (privileged/sandbox.py).
_BUFFERING = 1 << 16
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

LINUX = Platform(
    name="linux",
    freezable=FREEZABLE,
    crash_consistent=frozenset({"vfat", "msdos", "exfat"}),
)


_OCTAL = frozenset("01234567")


def unescape(field: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as \ooo."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and set(field[i + 1:i + 4]) <= _OCTAL:
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


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
        block = _is_block_backed(major, majmin, source)
        mounts.append(Mount(
            mountpoint=unescape(mountpoint),
            fstype=fstype,
            source=source,
            readonly="ro" in super_opts.split(","),
            local=fstype not in NETWORK and not fstype.startswith("nfs"),
            pseudo=not block,
            fs_key=majmin,
            backing_file=_loop_backing_file(source) if block else None,
            mount_id=mount_id,
        ))
    return mounts


def _is_block_backed(major: int, majmin: str, source: str) -> bool:
    if major != 0:
        return os.path.exists(f"/sys/dev/block/{majmin}")
    # btrfs (and a few others) report an anonymous device number: ask the source.
    if not source.startswith("/dev/"):
        return False
    try:
        return stat.S_ISBLK(os.stat(source).st_mode)
    except OSError:
        return False


def _loop_backing_file(source: str) -> str | None:
    try:
        st = os.stat(source)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode) or os.major(st.st_rdev) != LOOP_MAJOR:
        return None
    name = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/loop/backing_file"
    try:
        with open(name, encoding="utf-8", errors="replace", buffering=_BUFFERING) as f:
            path = f.read().rstrip("\n")
    except OSError:
        return None
    return path.removesuffix(" (deleted)") or None


def read_mounts() -> list[Mount]:
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape", buffering=_BUFFERING) as f:
        return parse_mountinfo(f.read())
