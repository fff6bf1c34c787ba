"""Scratch filesystems for the demo, the tests and the benchmarks.

Each is a sparse image file on a loop device, made and mounted by us, so that
freezing it can never touch anything else.  destroy() thaws before unmounting
(umount of a frozen filesystem would wait for a thaw that never comes).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

FITHAW = 0xC0045878

# Smallest sizes mkfs accepts (xfsprogs >= 5.19 refuses below 300 MiB); images are sparse.
MIN_MB = {"ext4": 16, "ext3": 16, "ext2": 16, "xfs": 300, "btrfs": 128, "vfat": 16}
MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"],
    "ext3": ["mkfs.ext3", "-q", "-F"],
    "ext2": ["mkfs.ext2", "-q", "-F"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
    "vfat": ["mkfs.vfat"],
}


class ScratchError(Exception):
    pass


@dataclass
class ScratchFS:
    fstype: str
    image: str
    device: str
    mountpoint: str

    def __str__(self) -> str:
        return f"{self.mountpoint} ({self.fstype} on {self.device})"


def _run(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise ScratchError(f"{argv[0]} is not installed") from None
    except subprocess.CalledProcessError as e:
        raise ScratchError(f"{' '.join(argv)}: {e.stderr.strip() or e}") from None
    return out.stdout.strip()


def make(workdir: str, fstype: str, name: str | None = None, size_mb: int | None = None,
         backing_dir: str | None = None, *, options: str = "") -> ScratchFS:
    """Create, attach and mount (with `options`, if any) one scratch filesystem under
    `workdir`."""
    if fstype not in MKFS:
        raise ScratchError(f"no recipe for {fstype}")
    name = name or fstype
    size = max(size_mb or 0, MIN_MB[fstype])
    image = os.path.join(backing_dir or workdir, f"{name.replace('/', '-')}.img")
    mountpoint = os.path.join(workdir, name)
    with open(image, "wb") as f:
        f.truncate(size << 20)
    device = ""
    try:
        _run([*MKFS[fstype], image])
        device = _attach(image)
        os.makedirs(mountpoint, exist_ok=True)
        _run(["mount", "-t", fstype, *(["-o", options] if options else []), device,
              mountpoint])
    except BaseException:
        if device:
            subprocess.run(["losetup", "-d", device], check=False, capture_output=True)
        with contextlib.suppress(OSError):
            os.unlink(image)
        raise
    return ScratchFS(fstype, image, device, mountpoint)


def _attach(image: str, attempts: int = 5) -> str:
    """losetup --find can race with another process taking the same free device."""
    for i in range(attempts):
        try:
            return _run(["losetup", "--find", "--show", image])
        except ScratchError:
            if i == attempts - 1:
                raise
            time.sleep(0.1 * (i + 1))
    raise AssertionError("unreachable")


def leave_dirty(mountpoint: str, mib: int) -> None:
    """`mib` MiB written to a file there and left in the page cache, not flushed."""
    chunk = b"d" * (1 << 20)
    fd = os.open(os.path.join(mountpoint, "dirty.dat"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for i in range(mib):
            os.pwrite(fd, chunk, i << 20)
    finally:
        os.close(fd)


def thaw(mountpoint: str) -> bool:
    """FITHAW; True if it was frozen.  Safe on anything (EINVAL = not frozen)."""
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.ioctl(fd, FITHAW, 0)
        return True
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTTY):
            raise
        return False
    finally:
        os.close(fd)


def destroy(fs: ScratchFS) -> None:
    while thaw(fs.mountpoint):  # undo stacked freezes, if any
        pass
    subprocess.run(["umount", fs.mountpoint], check=False, capture_output=True)
    if os.path.ismount(fs.mountpoint):
        subprocess.run(["umount", "-l", fs.mountpoint], check=False, capture_output=True)
    subprocess.run(["losetup", "-d", fs.device], check=False, capture_output=True)
    with contextlib.suppress(OSError):
        os.unlink(fs.image)
    with contextlib.suppress(OSError):
        os.rmdir(fs.mountpoint)


@contextlib.contextmanager
def filesystems(workdir: str, fstypes: list[str], size_mb: int | None = None,
                options: str = "") -> Iterator[list[ScratchFS]]:
    made: list[ScratchFS] = []
    try:
        for i, t in enumerate(fstypes):
            made.append(make(workdir, t, name=f"{t}{i}" if fstypes.count(t) > 1 else t,
                             size_mb=size_mb, options=options))
        yield made
    finally:
        for fs in reversed(made):
            destroy(fs)


def missing_tools(fstypes: list[str]) -> list[str]:
    needed = {"losetup", "mount", "umount"} | {MKFS[t][0] for t in fstypes if t in MKFS}
    return sorted(t for t in needed if shutil.which(t) is None)
