"""The FreeBSD UFS freezer against the model of ffs_suspend.c (tests/ufs_model.py).

Several UFS mounts, one descriptor each; every refusal ffs_susp_ioctl can
give, with the rollback it must cause; the mount table through getfsstat's
records, refused when their layout is not the one we know.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import threading
import time

import pytest

from privileged import ufs_kernel
from privileged.freeze_freebsd import FreeBSDFreezer
from privileged.freezer import FreezeFailed, Guard, Held, freeze_all, thaw
from privileged.mounts_freebsd import fsid_of
from privileged.selection import Mount
from privileged.statfs_freebsd import StatfsError
from privileged.ufs_kernel import read_fsstat
from tests.ufs_model import (
    FREEBSD11_STATFS_VERSION,
    MNT_LOCAL,
    MNT_RDONLY,
    UFSRESUME,
    ModelMount,
    UfsModel,
)

pytestmark = pytest.mark.freebsd_model


def fsid(n: int) -> bytes:
    return bytes([n, 0x8A, 0x3B, 0x5C, 0x35, 0, 0, 0])  # val[0] random, val[1] = ufs type 53


def table() -> list[ModelMount]:
    return [
        ModelMount("/", fsid(1), source="/dev/ada0p2"),
        ModelMount("/dev", fsid(2), "devfs", "devfs"),
        ModelMount("/usr/home", fsid(3), source="/dev/ada1p1"),
        ModelMount("/tmp", fsid(4), "tmpfs", "tmpfs"),
        ModelMount("/var", fsid(5), source="/dev/ada0p3"),
        ModelMount("/cdrom", fsid(6), "cd9660", "/dev/cd0", flags=MNT_LOCAL | MNT_RDONLY),
    ]


def model(mounts: list[ModelMount] | None = None, **kw: object) -> UfsModel:
    kw.setdefault("threads", lambda: 1)
    return UfsModel(table() if mounts is None else mounts, **kw)  # type: ignore[arg-type]


def freeze(freezer: FreeBSDFreezer, targets: list[Mount], presync: bool) -> list[Held]:
    """What the child does: with a deadline far away, so the thaw guard only watches."""
    guard = Guard(socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET), freezer.release,
                  lambda: None)
    try:
        return freeze_all(freezer, guard, targets, presync=presync,
                          deadline=time.monotonic() + 60, clock=time.monotonic)
    finally:
        guard.close()


def ufs_targets(freezer: FreeBSDFreezer) -> list[Mount]:
    return [m for m in freezer.mounts() if m.fstype == "ufs" and not m.readonly]


def test_mount_table_from_getfsstat_records():
    mounts = FreeBSDFreezer(model()).mounts()
    assert [(m.mountpoint, m.fstype, m.source, m.readonly, m.pseudo, m.local) for m in mounts] == [
        ("/", "ufs", "/dev/ada0p2", False, False, True),
        ("/dev", "devfs", "devfs", False, True, True),
        ("/usr/home", "ufs", "/dev/ada1p1", False, False, True),
        ("/tmp", "tmpfs", "tmpfs", False, True, True),
        ("/var", "ufs", "/dev/ada0p3", False, False, True),
        ("/cdrom", "cd9660", "/dev/cd0", True, False, True),
    ]
    assert mounts[0].fs_key == "018a3b5c35000000"


def test_three_ufs_filesystems_one_descriptor_each_and_thaw_closes_them_all():
    m = model()
    freezer = FreeBSDFreezer(m)
    targets = ufs_targets(freezer)
    held = freeze(freezer, targets, presync=False)
    assert m.suspended() == {"/", "/usr/home", "/var"}
    assert len({h.fd for h in held}) == 3 and all(m.fds[h.fd] for h in held if h.fd)
    assert thaw(freezer, held) == []
    assert m.suspended() == set() and m.fds == {}
    assert all(h.fd is None for h in held)
    assert [c for c, _, _ in m.calls] == ["suspend"] * 3 + ["close"] * 3


def test_the_stock_daemons_single_descriptor_leaves_one_suspended_and_fails():
    """What hv_vss_daemon does, against the model: the reason we open one per filesystem."""
    m = model()
    fd = m.open_suspend()
    m.suspend(fd, fsid(1))
    with pytest.raises(OSError) as e:
        m.suspend(fd, fsid(3))
    assert e.value.errno == errno.EBUSY
    assert m.suspended() == {"/"}  # the second was suspended and resumed again
    m.close(fd)
    assert m.suspended() == set()  # close resumes


def test_presync_runs_before_the_first_suspension():
    m = model()
    freeze(FreeBSDFreezer(m), ufs_targets(FreeBSDFreezer(m)), presync=True)
    assert m.calls[0][0] == "sync" and m.calls[1][0] == "suspend"


REFUSALS = {
    "EPERM: jailed": (dict(jailed=True), "/", errno.EPERM),
    "EACCES: no access to the device": ({"/var": dict(device_access=errno.EACCES)}, "/var",
                                        errno.EACCES),
    "ENOENT: being unmounted": ({"/var": dict(unmounting=True)}, "/var", errno.ENOENT),
    "EBUSY: suspended by someone else": ({"/var": dict(writesuspended=True)}, "/var",
                                         errno.EBUSY),
    "EIO: vfs_write_suspend failed": ({"/var": dict(suspend_error=errno.EIO)}, "/var",
                                      errno.EIO),
}


@pytest.mark.parametrize("setup,where,err", REFUSALS.values(), ids=REFUSALS.keys())
def test_a_refusal_rolls_back_every_descriptor_opened_so_far(setup, where, err):
    mounts = table()
    model_kw = {}
    for key, change in setup.items():
        if key.startswith("/"):
            for mm in mounts:
                if mm.mountpoint == key:
                    for attr, value in change.items():
                        setattr(mm, attr, value)
        else:
            model_kw[key] = change
    m = model(mounts, **model_kw)
    freezer = FreeBSDFreezer(m)
    already = m.suspended()
    with pytest.raises(FreezeFailed) as e:
        freeze(freezer, ufs_targets(freezer), presync=False)
    assert (e.value.mountpoint, e.value.errno) == (where, err)
    assert m.suspended() == already  # ours resumed; someone else's left alone
    assert m.fds == {}  # every descriptor we opened is closed


def test_enoent_when_the_filesystem_went_away_between_reading_and_freezing():
    m = model()
    freezer = FreeBSDFreezer(m)
    targets = ufs_targets(freezer)
    m.mounts = [mm for mm in m.mounts if mm.mountpoint != "/usr/home"]  # umount meanwhile
    with pytest.raises(FreezeFailed) as e:
        freeze(freezer, targets, presync=False)
    assert (e.value.mountpoint, e.value.errno) == ("/usr/home", errno.ENOENT)
    assert "no mounted filesystem has this fsid" in e.value.why
    assert m.suspended() == set() and m.fds == {}


def test_einval_for_a_filesystem_that_is_not_ufs():
    m = model()
    freezer = FreeBSDFreezer(m)
    tmp = next(mm for mm in freezer.mounts() if mm.mountpoint == "/tmp")
    with pytest.raises(FreezeFailed) as e:
        freeze(freezer, [tmp], presync=False)
    assert (e.value.errno, e.value.why) == (errno.EINVAL, "UFSSUSPEND: not a UFS filesystem")


def test_edeadlk_for_a_second_thread_counted_by_the_kernel():
    m = UfsModel(table())  # the real thread count of this process
    freezer = FreeBSDFreezer(m)
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        with pytest.raises(FreezeFailed) as e:
            freeze(freezer, ufs_targets(freezer), presync=False)
        assert e.value.errno == errno.EDEADLK
    finally:
        stop.set()
        t.join()
    assert m.fds == {} and m.suspended() == set()


def test_edeadlk_for_a_file_open_for_writing_on_the_filesystem(tmp_path):
    mounts = table()
    mounts[4].realdir = str(tmp_path)  # /var's contents
    m = model(mounts)
    freezer = FreeBSDFreezer(m)
    with open(tmp_path / "log", "a", encoding="utf-8"):
        with pytest.raises(FreezeFailed) as e:
            freeze(freezer, ufs_targets(freezer), presync=False)
        assert (e.value.mountpoint, e.value.errno) == ("/var", errno.EDEADLK)
    with open(tmp_path / "log", encoding="utf-8"):  # open for reading is fine
        held = freeze(freezer, ufs_targets(freezer), presync=False)
    assert "/var" in m.suspended()
    thaw(freezer, held)


def test_ufsresume_without_a_suspension_is_enoent_other_commands_enxio():
    m = model()
    fd = m.open_suspend()
    with pytest.raises(OSError) as e:
        m.ioctl(fd, UFSRESUME)
    assert e.value.errno == errno.ENOENT
    with pytest.raises(OSError) as e:
        m.ioctl(fd, 0x20005503)
    assert e.value.errno == errno.ENXIO
    m.ioctl(fd, 0x80085501, fsid(1))
    m.ioctl(fd, UFSRESUME)
    assert m.suspended() == set()
    m.close(fd)


def test_process_exit_resumes_everything_so_no_crash_record_is_needed():
    m = model()
    freezer = FreeBSDFreezer(m)
    freeze(freezer, ufs_targets(freezer), presync=False)
    m.exit_process()  # SIGKILL: the kernel closes the descriptors
    assert m.suspended() == set()
    assert freezer.recover([("018a3b5c35000000", "/")]) == []
    assert freezer.platform.freeze_outlives_holder is False


def test_no_ufssuspend_device_is_a_clear_failure():
    m = model(has_device=False)
    freezer = FreeBSDFreezer(m)
    with pytest.raises(FreezeFailed) as e:
        freeze(freezer, ufs_targets(freezer), presync=False)
    assert e.value.why == "open /dev/ufssuspend: No such file or directory"


def test_refuses_a_statfs_layout_it_does_not_know():
    with pytest.raises(StatfsError) as e:
        FreeBSDFreezer(model(version=FREEBSD11_STATFS_VERSION))
    assert str(e.value) == ("struct statfs version 0x20030518, expected 0x20140518 (FreeBSD 12 "
                            "or later): refusing to read the mount table with the wrong layout")


def test_refuses_zeroed_fsids_of_an_unprivileged_caller():
    with pytest.raises(StatfsError, match="fsid is zero"):
        FreeBSDFreezer(model(privileged=False))


def test_read_fsstat_sizes_the_buffer_and_retries_when_mounts_appear():
    records = [bytes([n]) * 2344 for n in range(1, 20)]
    counts = iter([3, 10, 10, 19, 19, 19])  # the table grows twice while we read it

    def getfsstat(buf, size, mode):
        n = next(counts)
        assert mode == 2  # MNT_NOWAIT: never wait on a hung filesystem
        if buf is None:
            return n
        fit = min(n, size // 2344)
        buf[:fit * 2344] = b"".join(records[:fit])
        return fit

    assert read_fsstat(getfsstat) == b"".join(records)


def test_a_thaw_whose_close_fails_is_named_and_the_others_are_still_thawed():
    m = model()
    freezer = FreeBSDFreezer(m)
    held = freeze(freezer, ufs_targets(freezer), presync=False)
    lost = next(h for h in held if h.mountpoint == "/var")
    os.close(lost.fd)  # gone behind the freezer's back: its close(2) is EBADF
    assert thaw(freezer, held) == ["/var: close: Bad file descriptor"]
    assert m.suspended() == {"/var"}  # the model's record of it: the descriptor was lost


def test_read_fsstat_gives_up_on_a_table_that_keeps_growing():
    grown = iter(range(1, 100))

    def getfsstat(buf, size, mode):
        n = next(grown) * 10  # more every time it is asked
        return n if buf is None else size // 2344

    with pytest.raises(OSError) as e:
        read_fsstat(getfsstat, attempts=3)
    assert e.value.errno == errno.EAGAIN
    asked: list[object] = []

    def counted(buf, size, mode):
        asked.append(buf)
        return getfsstat(buf, size, mode)

    with pytest.raises(OSError):
        read_fsstat(counted)  # eight tries by default, each a sizing call and a read
    assert len(asked) == 16 and asked[::2] == [None] * 8


def test_a_key_that_is_not_an_fsid_is_refused_before_any_suspension():
    bad = Mount("/x", "ufs", "/dev/x", readonly=False, local=True, pseudo=False, fs_key="0a0b")
    with pytest.raises(ValueError, match="is not an fsid"):
        fsid_of(bad)
    m = model()
    freezer = FreeBSDFreezer(m)
    with pytest.raises(ValueError, match="is not an fsid"):
        freezer.open([ufs_targets(freezer)[0], bad])
    assert m.fds == {} and m.suspended() == set()


def test_the_suspension_device_is_opened_read_write_and_close_on_exec(monkeypatch, tmp_path):
    """As the stock daemon opens /dev/ufssuspend (O_RDWR), and never inherited by anything
    the child could start."""
    node = tmp_path / "ufssuspend"
    node.write_bytes(b"")
    monkeypatch.setattr(ufs_kernel, "PATH_UFSSUSPEND", str(node))
    fd = ufs_kernel.LibcUfsKernel.open_suspend(object.__new__(ufs_kernel.LibcUfsKernel))
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        os.close(fd)


def test_a_refusal_without_words_of_ours_is_named_by_the_system_s_own():
    mounts = table()
    next(mm for mm in mounts if mm.mountpoint == "/var").suspend_error = errno.EIO
    freezer = FreeBSDFreezer(model(mounts))
    with pytest.raises(FreezeFailed) as e:
        freeze(freezer, ufs_targets(freezer), presync=False)
    assert e.value.why == f"UFSSUSPEND: {os.strerror(errno.EIO)}"


def test_a_failed_open_for_a_later_target_closes_the_ones_opened_before():
    m = model()
    freezer = FreeBSDFreezer(m)
    opened = m.open_suspend
    calls: list[int] = []

    def second_fails() -> int:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return opened()

    m.open_suspend = second_fails  # type: ignore[method-assign]
    with pytest.raises(FreezeFailed) as e:
        freeze(freezer, ufs_targets(freezer), presync=False)
    assert e.value.errno == errno.EMFILE and len(calls) == 2
    assert m.fds == {} and m.suspended() == set()


def test_a_zero_fsid_is_refused_on_ufs_only():
    """The kernel zeroes fsids for callers without PRIV_VFS_GENERATION, and a ufs fsid is
    what UFSSUSPEND needs; a filesystem the child never suspends may have any."""
    mounts = table()
    next(mm for mm in mounts if mm.mountpoint == "/tmp").fsid = bytes(8)
    assert "/tmp" in {m.mountpoint for m in FreeBSDFreezer(model(mounts)).mounts()}
    next(mm for mm in mounts if mm.mountpoint == "/var").fsid = bytes(8)
    with pytest.raises(StatfsError, match="/var: fsid is zero"):
        FreeBSDFreezer(model(mounts))


def test_the_thaw_guard_s_release_resumes_with_ufsresume_and_the_close_follows():
    """The guard's path (Guard's release): UFSRESUME on each descriptor resumes its
    filesystem at once; the child's later close of the same descriptor resumes nothing more."""
    m = model()
    freezer = FreeBSDFreezer(m)
    held = freeze(freezer, ufs_targets(freezer), presync=False)
    assert m.suspended() == {"/", "/usr/home", "/var"}
    for h in held:
        assert h.fd is not None
        freezer.release(h.fd)
    assert m.suspended() == set()
    assert all(h.fd in m.fds for h in held)  # still open: only the close lets go of them
    assert thaw(freezer, held) == []
    assert m.fds == {}


def test_the_real_seam_suspends_and_resumes_with_freebsd_s_two_ioctls(monkeypatch):
    """LibcUfsKernel, the one seam to FreeBSD's kernel that the model stands in for:
    UFSSUSPEND with the fsid, UFSRESUME with no argument, on the descriptor it is given."""
    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(ufs_kernel.fcntl, "ioctl", lambda *args: calls.append(args))
    kernel = object.__new__(ufs_kernel.LibcUfsKernel)
    kernel.suspend(7, fsid(3))
    kernel.resume(7)
    assert calls == [(7, 0x80085501, fsid(3)), (7, 0x20005502)]
    r, w = os.pipe()  # closing a /dev/ufssuspend descriptor is what resumes its suspension
    kernel.close(w)
    with pytest.raises(OSError) as closed:
        os.fstat(w)
    assert closed.value.errno == errno.EBADF
    os.close(r)


def test_the_real_seam_reads_the_mount_table_through_the_getfsstat_it_resolved(monkeypatch):
    """getfsstat is looked up once, when the seam is made (before any FREEZE), and is what
    the mount table is read through."""
    asked: list[str] = []

    def getfsstat(buf: object, size: int, mode: int) -> int:
        return 0  # an empty table: nothing to copy, and read_fsstat returns at once

    def function(name: str) -> object:
        asked.append(name)
        return getfsstat

    monkeypatch.setattr(ufs_kernel.libc, "function", function)
    kernel = ufs_kernel.LibcUfsKernel()
    assert asked == ["getfsstat"]
    assert kernel.getfsstat() == b"" and asked == ["getfsstat"]
