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
  the descriptors are close-on-exec.  During a FREEZE the thaw guard
  (freezer.py), a fork, shares them: it resumes with UFSRESUME through the
  shared open file if the deadline passes, and it has exited before the
  child thaws or rolls back by closing, so the child's close is the last;
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

import errno

from privileged.freezer import FreezeFailed, Held
from privileged.mounts_freebsd import FREEBSD, fsid_of, parse_mounts
from privileged.ufs_kernel import PATH_UFSSUSPEND, LibcUfsKernel

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from privileged.mounts import Mount
    from privileged.ufs_kernel import UfsKernel

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
    concurrent = False  # UFSSUSPEND: one single-threaded process, or EDEADLK

    def __init__(self, kernel: UfsKernel | None = None) -> None:
        self.kernel: UfsKernel = kernel if kernel is not None else LibcUfsKernel()
        # Read the table once now: a struct statfs we do not know is refused at start-up.
        self.mounts()

    def mounts(self, reuse: bool = False) -> list[Mount]:
        return parse_mounts(self.kernel.getfsstat())

    def open(self, targets: Sequence[Mount]) -> list[int]:
        """One /dev/ufssuspend descriptor per target.  Nothing to check against the
        mount table: UFSSUSPEND names its filesystem by fsid, not by a path."""
        fds: list[int] = []
        try:
            for m in targets:
                fsid_of(m)  # a malformed key is refused before anything is opened
                try:
                    fds.append(self.kernel.open_suspend())
                except OSError as e:
                    raise FreezeFailed(m.mountpoint, e.errno or 0,
                                       f"open {PATH_UFSSUSPEND}: {e.strerror}") from None
        except BaseException:
            for fd in fds:
                self.close(fd)
            raise
        return fds

    def worth_flushing(self) -> bool:
        return True  # no page-cache figures to ask; sync(2) starts the writes, cheaply

    def presync(self, targets: Sequence[Mount], fds: Sequence[int]) -> None:
        # No syncfs(2) here: sync(2) starts every write now, while writers still run,
        # so the suspension's own sync has less left to do with writers stopped.
        self.kernel.sync()

    def freeze_one(self, target: Mount, fd: int) -> bool:
        try:
            self.kernel.suspend(fd, fsid_of(target))
        except OSError as e:
            why = WHY.get(e.errno or 0, e.strerror or str(e))
            raise FreezeFailed(target.mountpoint, e.errno or 0, f"UFSSUSPEND: {why}") from None
        return True

    def thaw_one(self, held: Held) -> str | None:
        assert held.fd is not None
        try:
            self.kernel.close(held.fd)  # the last close resumes (ffs_susp_dtor)
        except OSError as e:
            return f"{held.mountpoint}: close: {e.strerror}"
        return None

    def release(self, fd: int) -> None:
        self.kernel.resume(fd)

    def close(self, fd: int) -> None:
        try:
            self.kernel.close(fd)
        except OSError:
            pass

    def recover(self, records: Sequence[tuple[str, str]]) -> list[str]:
        """Nothing to do: a dead child's descriptors were closed, so its suspensions ended."""
        return []
