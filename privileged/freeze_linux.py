"""Linux: FIFREEZE / FITHAW on the filesystems the child selected, and nothing else.

Facts this relies on (ioctl_fsfreeze, freeze_super in fs/super.c):
- a freeze belongs to the superblock, not to the process: it outlives us, so
  every exit path of the child thaws, and a crash record covers SIGKILL;
- freeze_super blocks new writers first and then syncs, so writers stall for
  as long as that sync takes; a syncfs() while still writable shrinks it,
  when there is enough dirty data for that to matter (worth_flushing);
- a second FIFREEZE of a frozen superblock is EBUSY: with duplicates removed
  by selection, EBUSY means someone else froze it, and we must not thaw it;
- FITHAW of a superblock that is not frozen is EINVAL.

Root acts only on what it checked.  Selection names a mountpoint; anyone who
owns a directory above it could swap that directory (for a symlink, or by
renaming, which moves whatever is mounted below it) between the reading of
the mount table and the open.  So a target is opened one component at a
time, never following a symlink (openat with O_NOFOLLOW; openat2's
RESOLVE_NO_SYMLINKS would do the same in one call, but its flags live in a
struct that the seccomp filter cannot read, while openat's are an argument
it checks), and then the mount table is read again: the mount each
descriptor is on (its mnt_id, which the open descriptor keeps from being
reused) must belong to the superblock selection chose.  Otherwise nothing is
frozen.  Crash recovery opens and checks the same way before it thaws.
"""


from __future__ import annotations

import errno
import fcntl
import os

from privileged import libc
from privileged.freezer import FreezeFailed, Held
from privileged.mounts_linux import LINUX, MOUNTINFO, parse_mountinfo, read

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from privileged.mounts import Mount

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)

# A flush before FIFREEZE costs about 2 ms even when nothing is dirty, and makes the
# freeze's RCU grace periods more often a tick longer; below this much dirty or
# under-writeback data (system-wide) the freeze's own flush is as short anyway.
PRESYNC_MIN_KB = 1024
MEMINFO = "/proc/meminfo"
_STEP = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LAST = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_syncfs = libc.function("syncfs")


def open_nofollow(path: str) -> int:
    """A read-only descriptor for the directory `path`, reached without following any
    symlink on the way (each component opened with O_NOFOLLOW; mounts are crossed)."""
    names = path.split("/")[1:] if path != "/" else []
    if not path.startswith("/") or any(n in ("", ".", "..") for n in names):
        raise OSError(errno.EINVAL, f"{path!r} is not a normalized absolute path")
    fd = os.open("/", _STEP if names else _LAST)
    try:
        for i, name in enumerate(names):
            step = os.open(name, _LAST if i == len(names) - 1 else _STEP, dir_fd=fd)
            os.close(fd)
            fd = step
    except BaseException:
        os.close(fd)
        raise
    return fd


def mount_id(fd: int) -> int:
    """The id of the mount an open descriptor is on (/proc/self/fdinfo, Linux 3.15+)."""
    for line in read(f"/proc/self/fdinfo/{fd}").splitlines():
        key, _, value = line.partition(":")
        if key == "mnt_id":
            return int(value)
    raise OSError(errno.ENOTSUP, "this kernel does not say which mount a descriptor is on")


class LinuxFreezer:
    platform = LINUX
    concurrent = True  # independent targets at once (privileged/concurrent.py)

    def __init__(self) -> None:
        self._parsed: tuple[str, list[Mount]] = ("", [])

    def mounts(self, reuse: bool = False) -> list[Mount]:
        """The mount table; with `reuse`, the last one parsed while /proc/self/mountinfo
        reads the same text (the parse, a stat or two per line, is most of a CHECK's work
        and of a FREEZE's before its first open: the host sends CHECK just before)."""
        text = read(MOUNTINFO)
        if not reuse or text != self._parsed[0]:
            self._parsed = (text, parse_mountinfo(text))
        return list(self._parsed[1])

    def open(self, targets: Sequence[Mount]) -> list[int]:
        """Each target opened without following a symlink, then checked: the mount its
        descriptor is on (read from the mount table after the opens, while the open
        descriptors pin the ids) must belong to the superblock selection chose."""
        fds: list[int] = []
        try:
            for m in targets:
                try:
                    fds.append(open_nofollow(m.mountpoint))
                except OSError as e:
                    raise FreezeFailed(m.mountpoint, e.errno or 0,
                                       f"open: {e.strerror}") from None
            # Ids and keys are the text's own fields: the parse of the same text serves.
            table = {m.mount_id: m for m in self.mounts(reuse=True)}
            for m, fd in zip(targets, fds, strict=True):
                found = table.get(mount_id(fd))
                if found is None or found.fs_key != m.fs_key:
                    where = f"{found.mountpoint} ({found.fs_key})" if found else "an unlisted mount"
                    raise FreezeFailed(m.mountpoint, errno.EXDEV,
                                       f"the path now leads to {where}, not to the selected "
                                       f"filesystem {m.fs_key}: refused, nothing frozen")
        except BaseException:
            for fd in fds:
                self.close(fd)
            raise
        return fds

    def worth_flushing(self) -> bool:
        """At least PRESYNC_MIN_KB dirty or under writeback (/proc/meminfo), or unknown."""
        try:
            return sum(int(line.split()[1]) for line in read(MEMINFO).splitlines()
                       if line.startswith(("Dirty:", "Writeback:"))) >= PRESYNC_MIN_KB
        except (OSError, ValueError, IndexError):
            return True

    def presync(self, targets: Sequence[Mount], fds: Sequence[int]) -> None:
        for m, fd in zip(targets, fds, strict=True):
            try:
                _syncfs(fd)
            except OSError as e:
                raise FreezeFailed(m.mountpoint, e.errno or 0, f"syncfs: {e.strerror}") from None

    def freeze_one(self, target: Mount, fd: int) -> bool:
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
        except OSError as e:
            if e.errno == errno.EBUSY:
                return False
            raise FreezeFailed(target.mountpoint, e.errno or 0,
                               f"FIFREEZE: {e.strerror}") from None
        return True

    def thaw_one(self, held: Held) -> str | None:
        assert held.fd is not None
        try:
            fcntl.ioctl(held.fd, FITHAW, 0)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return f"{held.mountpoint} was already thawed by someone else"
            return f"{held.mountpoint}: FITHAW: {e.strerror}"
        finally:
            os.close(held.fd)
        return None

    def release(self, fd: int) -> None:
        fcntl.ioctl(fd, FITHAW, 0)

    def close(self, fd: int) -> None:
        try:
            os.close(fd)
        except OSError:
            pass

    def recover(self, records: Sequence[tuple[str, str]]) -> list[str]:
        """Thaw what a previous child recorded and did not live to thaw."""
        notes = [self._recover_one(fs_key, mountpoint) for fs_key, mountpoint in reversed(records)]
        return [n for n in notes if n]

    def _recover_one(self, fs_key: str, mountpoint: str, attempts: int = 3) -> str | None:
        """The filesystem is found by its key where the mount table says it is now, and
        opened and checked as a FREEZE would: a path that changes under us is read again,
        and never leads to a thaw of anything else."""
        why = ""
        for _ in range(attempts):
            same = [m for m in self.mounts() if m.fs_key == fs_key]
            if not same:
                return f"{mountpoint} ({fs_key}) is no longer mounted"
            m = next((c for c in same if c.mountpoint == mountpoint), same[0])
            try:
                fd = self.open([m])[0]
            except FreezeFailed as e:
                why = e.why
                continue
            problem = self.thaw_one(Held(m.mountpoint, fs_key, fd))
            if problem is None:
                return f"thawed {m.mountpoint}, left frozen by a previous instance"
            return None if problem.endswith("by someone else") else problem
        return f"{mountpoint} ({fs_key}): {why}; left as it is"
