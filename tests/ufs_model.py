"""A model of FreeBSD's UFS write suspension (sys/ufs/ffs/ffs_suspend.c) and getfsstat(2).

It implements privileged.ufs_kernel.UfsKernel, so FreeBSDFreezer runs on it
unchanged.  Standard library only: it also runs inside a real root child
process (child_main below).  Read from ffs_suspend.c at revision 00c0e20c
(main) and 763674b7 (older, without the EDEADLK checks); the rules, each
with the function it comes from:

- /dev/ufssuspend opens for anyone who may open it, any number of times
  (ffs_susp_open); it is missing when UFS is not in the kernel (ENOENT);
- UFSSUSPEND checks, in ffs_susp_ioctl's order: a jailed caller is EPERM;
  no mount with that fsid is ENOENT (vfs_getvfs); an unmount in progress
  fails vfs_busy, ENOENT here [inference: the errno vfs_busy returns]; a
  process with more than one thread is EDEADLK (p_numthreads); a file open
  for writing on that mount is EDEADLK (descrip_check_write_mp); a mount
  that is not UFS is EINVAL (ffs_own_mount); a mount already suspended
  through ufssuspend is EBUSY (UM_WRITESUSPENDED); no read-write access to
  the device is that error, EACCES (VOP_ACCESS); vfs_write_suspend's error
  passes through; and a descriptor that already holds a suspension suspends
  the mount, fails to attach it with EBUSY (devfs_set_cdevpriv) and resumes
  it again (ffs_susp_unsuspend);
- the suspension belongs to the descriptor; its last close resumes the mount
  (ffs_susp_dtor), and so does the process's exit;
- UFSRESUME without a suspension on the descriptor is ENOENT
  (devfs_get_cdevpriv), any other command ENXIO;
- getfsstat(2) fills struct statfs records laid out as the reference says
  (written here by offset, independently of privileged/statfs_freebsd.py),
  with fsids zeroed for a caller without PRIV_VFS_GENERATION.

The thread count and the write-open check are the calling process's real
ones by default: /proc/self/task, and /proc/self/fd entries that are regular
files open for writing below the mount's `realdir` (a real directory that
stands for the mount's contents).  Not modelled: MAC, and the busy reference
that 00c0e20c leaks when it returns EDEADLK (it breaks out without
vfs_unbusy).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

STATFS_VERSION = 0x20140518
FREEBSD11_STATFS_VERSION = 0x20030518  # 88-byte names: to be refused
STATFS_SIZE = 2344
MNT_RDONLY = 0x1
MNT_LOCAL = 0x1000
MNT_ROOTFS = 0x4000
UFSSUSPEND = 0x80085501
UFSRESUME = 0x20005502


@dataclass
class ModelMount:
    mountpoint: str
    fsid: bytes
    fstype: str = "ufs"
    source: str = ""
    flags: int = MNT_LOCAL
    unmounting: bool = False
    device_access: int = 0  # what VOP_ACCESS(VREAD|VWRITE) on the device returns
    suspend_error: int = 0  # what vfs_write_suspend returns
    realdir: str | None = None
    writesuspended: bool = False  # UM_WRITESUSPENDED

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ModelMount:
        d = dict(d)
        d["fsid"] = bytes.fromhex(str(d["fsid"]))
        return cls(**d)  # type: ignore[arg-type]


def real_thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def real_write_open(m: ModelMount) -> bool:
    """descrip_check_write_mp, on this process's real descriptors."""
    if m.realdir is None:
        return False
    top = os.path.realpath(m.realdir)
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
            mode = os.fstat(int(name)).st_mode
            access = fcntl.fcntl(int(name), fcntl.F_GETFL) & os.O_ACCMODE
        except OSError:
            continue
        if stat.S_ISREG(mode) and access != os.O_RDONLY and (
                target == top or target.startswith(top + "/")):
            return True
    return False


@dataclass
class UfsModel:
    mounts: list[ModelMount]
    jailed: bool = False
    privileged: bool = True  # PRIV_VFS_GENERATION: otherwise getfsstat zeroes fsids
    version: int = STATFS_VERSION
    has_device: bool = True  # /dev/ufssuspend exists (UFS is in the kernel)
    threads: Callable[[], int] = real_thread_count
    write_open: Callable[[ModelMount], bool] = real_write_open
    events_path: str | None = None  # JSON lines, for a model living in another process
    fds: dict[int, ModelMount | None] = field(default_factory=dict)  # fd -> its cdevpriv
    calls: list[tuple[str, str, int]] = field(default_factory=list)  # (call, mount, errno)

    # --- UfsKernel ----------------------------------------------------------------

    def getfsstat(self) -> bytes:
        return b"".join(self._statfs(m) for m in self.mounts)

    def open_suspend(self) -> int:
        if not self.has_device:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        # A real descriptor, so that the process's descriptor table is what it would be.
        fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.fds[fd] = None
        return fd

    def suspend(self, fd: int, fsid: bytes) -> None:
        mp = self._find(fsid)
        err = self._susp_ioctl(fd, fsid)
        self._record("suspend", mp.mountpoint if mp else fsid.hex(), err)
        if err:
            raise OSError(err, os.strerror(err))

    def close(self, fd: int) -> None:
        os.close(fd)  # EBADF for a descriptor that is not open, as close(2)
        mp = self.fds.pop(fd)
        if mp is not None:
            self._dtor(mp)
        self._record("close", mp.mountpoint if mp else "-", 0)

    def sync(self) -> None:
        self._record("sync", "-", 0)

    # --- the rest of the device, and the process -------------------------------------

    def resume(self, fd: int) -> None:
        """UFSRESUME."""
        mp = self.fds.get(fd)
        if mp is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        self.fds[fd] = None  # devfs_clear_cdevpriv runs the destructor
        self._dtor(mp)

    def ioctl(self, fd: int, cmd: int, arg: bytes = b"") -> None:
        if cmd == UFSSUSPEND:
            self.suspend(fd, arg)
        elif cmd == UFSRESUME:
            self.resume(fd)
        else:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))

    def exit_process(self) -> None:
        """The process dies: the kernel closes every descriptor it held."""
        for fd in list(self.fds):
            self.close(fd)

    def suspended(self) -> set[str]:
        return {m.mountpoint for m in self.mounts if m.writesuspended}

    # --- internals, named after the functions they model ----------------------------

    def _find(self, fsid: bytes) -> ModelMount | None:
        return next((m for m in self.mounts if m.fsid == fsid), None)  # vfs_getvfs

    def _susp_ioctl(self, fd: int, fsid: bytes) -> int:
        """ffs_susp_ioctl, case UFSSUSPEND: 0 or the errno."""
        if self.jailed:
            return errno.EPERM
        mp = self._find(fsid)
        if mp is None or mp.unmounting:
            return errno.ENOENT
        if self.threads() > 1:
            return errno.EDEADLK
        if self.write_open(mp):
            return errno.EDEADLK
        err = self._susp_suspend(mp)
        if err:
            return err
        if self.fds.get(fd) is not None:  # devfs_set_cdevpriv: the descriptor already has one
            mp.writesuspended = False  # ffs_susp_unsuspend
            return errno.EBUSY
        self.fds[fd] = mp
        return 0

    def _susp_suspend(self, mp: ModelMount) -> int:
        """ffs_susp_suspend."""
        if mp.fstype != "ufs":
            return errno.EINVAL
        if mp.writesuspended:
            return errno.EBUSY
        if mp.device_access:
            return mp.device_access
        if mp.suspend_error:
            return mp.suspend_error
        mp.writesuspended = True
        return 0

    def _dtor(self, mp: ModelMount) -> None:
        """ffs_susp_dtor: reload and resume."""
        mp.writesuspended = False

    def _statfs(self, m: ModelMount) -> bytes:
        buf = bytearray(STATFS_SIZE)
        struct.pack_into("<I", buf, 0, self.version)
        struct.pack_into("<Q", buf, 8, m.flags)
        buf[192:200] = m.fsid if self.privileged else bytes(8)
        for offset, size, text in ((280, 16, m.fstype), (296, 1024, m.source),
                                   (1320, 1024, m.mountpoint)):
            data = text.encode("utf-8", "surrogateescape")[:size - 1]
            buf[offset:offset + len(data)] = data
        return bytes(buf)

    def _record(self, call: str, mount: str, err: int) -> None:
        self.calls.append((call, mount, err))
        if self.events_path is not None:
            line = json.dumps({"call": call, "mount": mount, "errno": err,
                               "threads": self.threads()})
            fd = os.open(self.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode() + b"\n")
            finally:
                os.close(fd)


def child_main(argv: list[str]) -> int:
    """The real root child (privileged.child.main), with this model as its kernel.

    argv: --model PATH (JSON: mounts, events, release_stdio), then the child's own."""
    if argv[:1] != ["--model"]:
        raise SystemExit("usage: --model PATH child-arguments...")
    with open(argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    model = UfsModel([ModelMount.from_dict(m) for m in spec["mounts"]],
                     events_path=spec["events"])

    from privileged import child
    from privileged.freeze_freebsd import FreeBSDFreezer

    def pick_freezer(memory: bool = False) -> FreeBSDFreezer:
        return FreeBSDFreezer(model)

    child.pick_freezer = pick_freezer  # type: ignore[assignment]
    # As on FreeBSD, no seccomp filter (privileged/sandbox.py is Linux only); this model
    # also reads /proc/self/fd with calls the Linux child's filter refuses.
    child.confine_child = lambda device: "no sandbox (FreeBSD)"  # type: ignore[assignment]
    if not spec["release_stdio"]:  # the control: keep the parent's stderr as given
        child.quiet_stdio = lambda: None  # type: ignore[assignment]
    return child.main(argv[2:])


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
