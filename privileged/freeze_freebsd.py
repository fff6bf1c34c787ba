"""FreeBSD: suspend UFS through /dev/ufssuspend, one descriptor per filesystem.

Facts this relies on (sys/ufs/ffs/ffs_suspend.c, ffs_susp_ioctl and friends):
- the suspension belongs to the open file, not the process: devfs_set_cdevpriv
  attaches the mount to the descriptor, and one descriptor holds at most one
  (a second UFSSUSPEND through it suspends, fails to attach with EBUSY, and
  resumes again).  The stock hv_vss_daemon suspends every filesystem through
  one descriptor, so with two UFS filesystems it reports failure and leaves
  the first suspended.  We open one descriptor per filesystem;
- closing the descriptor resumes its filesystem (ffs_susp_dtor), and so does
  our death, since the kernel closes what a dead process held.  That is the
  thaw, the rollback of a partial freeze, and the crash recovery: nothing
  outlives the child, so there is no crash record to keep (statefile.py);
  the descriptors are close-on-exec and the child never forks;
- UFSSUSPEND refuses (EDEADLK) a process with more than one thread or holding
  a file open for writing on that filesystem (descrip_check_write_mp; in the
  current tree, not in every release).  The child is single-threaded by
  construction, and the only descriptors it inherits that could be such a
  file are stdin, stdout and stderr, which point at /dev/null as soon as its
  log channel is up (hardening.quiet_stdio);
- a mount already suspended through /dev/ufssuspend is EBUSY.  Unlike Linux
  (freeze_linux.py) we do not count that as frozen: the other holder may
  resume it during the snapshot, and EBUSY also means an unmount in progress;
- there is no kernel timeout: the child's watchdog is the only one.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Sequence

from privileged.freezer import FreezeFailed, Held
from privileged.mounts_freebsd import FREEBSD, fsid_of, parse_mounts
from privileged.selection import Mount
from privileged.ufs_kernel import PATH_UFSSUSPEND, LibcUfsKernel, UfsKernel

# Why ffs_susp_ioctl says no, in the order it checks.
WHY = {
    errno.EPERM: "refused inside a jail (or by a MAC policy)",
    errno.ENOENT: "no mounted filesystem has this fsid (unmounted since the table was read?)",
    errno.EDEADLK: "the kernel wants a single-threaded caller holding no file open for "
                   "writing on this filesystem",
    errno.EINVAL: "not a UFS filesystem",
    errno.EBUSY: "already suspended through /dev/ufssuspend by someone else (hv_vss_daemon?), "
                 "or being unmounted",
    errno.EACCES: "no read-write access to the filesystem's device",
}


class FreeBSDFreezer:
    platform = FREEBSD

    def __init__(self, kernel: UfsKernel | None = None) -> None:
        self.kernel: UfsKernel = kernel if kernel is not None else LibcUfsKernel()
        # Read the table once now: a struct statfs we do not know is refused at start-up.
        self.mounts()

    def mounts(self) -> list[Mount]:
        return parse_mounts(self.kernel.getfsstat())

    def freeze(self, targets: Sequence[Mount], presync: bool) -> list[Held]:
        if presync:
            # No syncfs(2) here: sync(2) starts every write now, while writers still run,
            # so the suspension's own sync has less left to do with writers stopped.
            self.kernel.sync()
        held: list[Held] = []
        try:
            for m in targets:
                held.append(self._suspend(m))
        except BaseException:
            self.thaw(held)  # closing resumes: the rollback is the thaw
            raise
        return held

    def _suspend(self, m: Mount) -> Held:
        try:
            fd = self.kernel.open_suspend()
        except OSError as e:
            raise FreezeFailed(m.mountpoint, e.errno or 0,
                               f"open {PATH_UFSSUSPEND}: {e.strerror}") from None
        try:
            self.kernel.suspend(fd, fsid_of(m))
        except BaseException as e:
            with contextlib.suppress(OSError):
                self.kernel.close(fd)
            if isinstance(e, OSError):
                why = WHY.get(e.errno or 0, e.strerror or str(e))
                raise FreezeFailed(m.mountpoint, e.errno or 0, f"UFSSUSPEND: {why}") from None
            raise
        return Held(m.mountpoint, m.fs_key, fd)

    def thaw(self, held: Sequence[Held]) -> list[str]:
        problems = []
        for h in reversed(held):
            if h.fd is None:
                continue
            try:
                self.kernel.close(h.fd)
            except OSError as e:
                problems.append(f"{h.mountpoint}: close: {e.strerror}")
            finally:
                h.fd = None
        return problems

    def recover(self, records: Sequence[tuple[str, str]]) -> list[str]:
        """Nothing to do: a dead child's descriptors were closed, so its suspensions ended."""
        return []
