"""Golden constants and struct layouts, against the reference (shared/reference/freebsd-vss.md).

The ioctl numbers are recomputed here from sys/sys/ioccom.h's macros, the
struct offsets from the field sizes, so a typo in either place shows.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

import pytest

from agent.config import FREEBSD_DEVICE
from agent.kernel import freebsd_wire as fw
from agent.simulator import host
from privileged import statfs_freebsd as sf
from privileged import ufs_kernel
from tests import ufs_model

pytestmark = pytest.mark.freebsd_model

# sys/sys/ioccom.h
IOCPARM_MASK = (1 << 13) - 1
IOC_VOID, IOC_OUT, IOC_IN = 0x20000000, 0x40000000, 0x80000000


def _ioc(inout: int, group: str, num: int, length: int) -> int:
    return inout | ((length & IOCPARM_MASK) << 16) | (ord(group) << 8) | num


def test_ioctl_numbers_from_the_ioccom_macros():
    assert _ioc(IOC_OUT, "v", 2, 64) == fw.IOCHVVSSREAD == 0x40407602
    assert _ioc(IOC_IN, "v", 3, 64) == fw.IOCHVVSSWRITE == 0x80407603
    assert _ioc(IOC_IN, "U", 1, 8) == ufs_kernel.UFSSUSPEND == 0x80085501
    assert _ioc(IOC_VOID, "U", 2, 0) == ufs_kernel.UFSRESUME == 0x20005502
    assert (ufs_model.UFSSUSPEND, ufs_model.UFSRESUME) == (0x80085501, 0x20005502)


def test_this_python_takes_the_requests_as_positive_ints():
    """CPython's ioctl request type changed (gh-69214): above 2**31 must still pass."""
    fd = os.open(os.devnull, os.O_RDWR)
    try:
        for request, arg in ((ufs_kernel.UFSSUSPEND, bytes(8)),
                             (fw.IOCHVVSSWRITE, bytes(64)), (fw.IOCHVVSSREAD, bytes(64))):
            with pytest.raises(OSError) as e:  # not OverflowError: the number got through
                fcntl.ioctl(fd, request, arg)
            assert e.value.errno == errno.ENOTTY
    finally:
        os.close(fd)


def test_hv_vss_opt_msg_layout():
    assert fw.MSG.format == "<IIQ48s" and fw.MSG_SIZE == 64
    raw = fw.MSG.pack(0x11111111, 0x22222222, 0x3333333344444444, b"\x55" * 48)
    assert raw[0:4] == b"\x11" * 4 and raw[4:8] == b"\x22" * 4
    assert raw[8:16] == bytes.fromhex("4444444433333333") and raw[16:] == b"\x55" * 48
    assert (fw.HV_VSS_NONE, fw.HV_VSS_CHECK, fw.HV_VSS_FREEZE, fw.HV_VSS_THAW) == (0, 1, 2, 3)
    assert (fw.VSS_SUCCESS, fw.VSS_FAIL) == (0, 1)
    assert FREEBSD_DEVICE == "/dev/hv_fsvss_dev"


def test_host_side_constants():
    assert (host.VSS_OP_HOT_BACKUP, host.VSS_OP_GET_DM_INFO, host.VSS_OP_FREEZE,
            host.VSS_OP_THAW) == (2, 3, 5, 6)
    assert (host.HV_S_OK, host.HV_E_FAIL, host.VSS_HBU_NO_AUTO_RECOVERY) == (0, 0x80004005, 5)


# sys/sys/mount.h, as the reference gives it (privileged/ keeps only what it uses)
MFSNAMELEN, MNAMELEN = 16, 1024
OFFSET_FSID, OFFSET_FSTYPENAME, OFFSET_MNTFROMNAME, OFFSET_MNTONNAME = 192, 280, 296, 1320


def test_struct_statfs_layout():
    assert sf.STATFS_SIZE == 2344 and sf.STATFS_SIZE % 8 == 0
    fields = sf.STATFS.format[1:]
    head = struct.calcsize("<" + fields.split("8s")[0])
    assert head == OFFSET_FSID
    names = sf.STATFS.format.rsplit("8s", 1)[1]
    assert names == f"80s{MFSNAMELEN}s{MNAMELEN}s{MNAMELEN}s"
    assert (OFFSET_FSTYPENAME, OFFSET_MNTFROMNAME, OFFSET_MNTONNAME) == (
        head + 8 + 80, head + 8 + 80 + MFSNAMELEN, head + 8 + 80 + MFSNAMELEN + MNAMELEN)
    assert sf.STATFS_VERSION == ufs_model.STATFS_VERSION == 0x20140518
    assert ufs_model.FREEBSD11_STATFS_VERSION == 0x20030518
    assert (sf.MNT_RDONLY, sf.MNT_LOCAL, sf.MNT_NOWAIT) == (0x1, 0x1000, 2)
    assert (ufs_model.MNT_RDONLY, ufs_model.MNT_LOCAL, ufs_model.MNT_ROOTFS) == (
        0x1, 0x1000, 0x4000)


def test_a_record_written_by_offset_decodes_field_by_field():
    """The model writes records by the reference's offsets; our decoder reads them."""
    name = "/var/" + "x" * 1000  # long names use the full 1024-byte fields
    m = ufs_model.ModelMount(name, bytes.fromhex("0123456789abcdef"), "ufs", "/dev/ada0p3",
                             flags=sf.MNT_LOCAL | ufs_model.MNT_ROOTFS)
    (e,) = sf.decode(ufs_model.UfsModel([m]).getfsstat())
    assert (e.mntonname, e.mntfromname, e.fstypename) == (name, "/dev/ada0p3", "ufs")
    assert e.fsid == bytes.fromhex("0123456789abcdef")
    assert e.flags == sf.MNT_LOCAL | ufs_model.MNT_ROOTFS


def test_partial_records_are_refused():
    with pytest.raises(sf.StatfsError, match="not a whole number"):
        sf.decode(bytes(2344 + 100))
