"""Linux: FIFREEZE / FITHAW on the mountpoints the child selected.

Facts this relies on (ioctl_fsfreeze, freeze_super in fs/super.c):
- a freeze belongs to the superblock, not to the process: it outlives us, so
  every exit path of the child thaws, and a crash record covers SIGKILL;
- freeze_super blocks new writers first and then syncs, so writers stall for
  as long as that sync takes; a syncfs() while still writable shrinks it;
- a second FIFREEZE of a frozen superblock is EBUSY: with duplicates removed
  by selection, EBUSY means someone else froze it, and we must not thaw it;
- FITHAW of a superblock that is not frozen is EINVAL.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from collections.abc import Callable, Sequence

from privileged.freezer import FreezeFailed, Held
from privileged.mounts_linux import LINUX, read_mounts
from privileged.selection import Mount

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)

_OPEN_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _libc_syncfs() -> Callable[[int], None]:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.syncfs
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int

    def syncfs(fd: int) -> None:
        if fn(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    return syncfs


class LinuxFreezer:
    platform = LINUX

    def __init__(self) -> None:
        # Resolved now: no library loading once the sandbox is on.
        self._syncfs = _libc_syncfs()

    def mounts(self) -> list[Mount]:
        return read_mounts()

    def freeze(self, targets: Sequence[Mount], presync: bool) -> list[Held]:
        fds: list[int] = []
        try:
            for m in targets:
                fds.append(self._open(m))
            if presync:
                for m, fd in zip(targets, fds, strict=True):
                    try:
                        self._syncfs(fd)
                    except OSError as e:
                        raise FreezeFailed(m.mountpoint, e.errno or 0,
                                           f"syncfs: {e.strerror}") from None
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        held: list[Held] = []
        for i, (m, fd) in enumerate(zip(targets, fds, strict=True)):
            try:
                fcntl.ioctl(fd, FIFREEZE, 0)
                held.append(Held(m.mountpoint, m.fs_key, fd))
            except OSError as e:
                if e.errno == errno.EBUSY:
                    os.close(fd)
                    held.append(Held(m.mountpoint, m.fs_key, None))
                    continue
                for rest in fds[i:]:
                    os.close(rest)
                self.thaw(held)
                raise FreezeFailed(m.mountpoint, e.errno or 0, f"FIFREEZE: {e.strerror}") from None
            except BaseException:
                for rest in fds[i:]:
                    os.close(rest)
                self.thaw(held)
                raise
        return held

    def _open(self, m: Mount) -> int:
        try:
            return os.open(m.mountpoint, _OPEN_FLAGS)
        except OSError as e:
            raise FreezeFailed(m.mountpoint, e.errno or 0, f"open: {e.strerror}") from None

    def thaw(self, held: Sequence[Held]) -> list[str]:
        problems = []
        for h in reversed(held):
            if h.fd is None:
                continue
            try:
                fcntl.ioctl(h.fd, FITHAW, 0)
            except OSError as e:
                if e.errno == errno.EINVAL:
                    problems.append(f"{h.mountpoint} was already thawed by someone else")
                else:
                    problems.append(f"{h.mountpoint}: FITHAW: {e.strerror}")
            finally:
                os.close(h.fd)
                h.fd = None
        return problems

    def recover(self, records: Sequence[tuple[str, str]]) -> list[str]:
        """Thaw what a previous child recorded and did not live to thaw."""
        current = {(m.mountpoint, m.fs_key) for m in self.mounts()}
        notes = []
        for fs_key, mountpoint in reversed(records):
            if (mountpoint, fs_key) not in current:
                notes.append(f"{mountpoint} ({fs_key}) is no longer mounted")
                continue
            try:
                fd = os.open(mountpoint, _OPEN_FLAGS)
            except OSError as e:
                notes.append(f"{mountpoint}: open: {e.strerror}")
                continue
            try:
                fcntl.ioctl(fd, FITHAW, 0)
                notes.append(f"thawed {mountpoint}, left frozen by a previous instance")
            except OSError as e:
                if e.errno != errno.EINVAL:
                    notes.append(f"{mountpoint}: FITHAW: {e.strerror}")
            finally:
                os.close(fd)
        return notes
