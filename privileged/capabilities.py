"""Linux: the root child keeps two capabilities and gives up every other one, for good.

FIFREEZE and FITHAW need CAP_SYS_ADMIN (ioctl_fsfreeze, ioctl_fsthaw).
CAP_DAC_READ_SEARCH lets it open any mountpoint read-only, whoever owns the
directory and every directory on the way (a home directory of mode 0700 is
mounted and frozen like any other).  Nothing else it does needs one: its
config, state directory and device node are root's own (uid 0 is their
owner), /proc/self and /sys are readable by all.  Without CAP_DAC_OVERRIDE,
CAP_CHOWN, CAP_FOWNER, CAP_SETUID, CAP_SYS_MODULE, CAP_SYS_PTRACE, CAP_NET_*
... a compromised child cannot write a file root does not own through a
permission, take another uid, load a module or trace a process.

Dropped from the bounding set (needs CAP_SETPCAP, dropped last), the ambient
set, and the effective, permitted and inheritable sets, in that order.
"""

from __future__ import annotations

import ctypes
import errno
import os

CAP_DAC_READ_SEARCH = 2
CAP_SETPCAP = 8
CAP_SYS_ADMIN = 21
KEEP = frozenset({CAP_DAC_READ_SEARCH, CAP_SYS_ADMIN})

_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAPABILITY_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def keep_only(keep: frozenset[int] = KEEP) -> None:
    """Leave this process with exactly `keep` (if it had them); OSError if it cannot."""
    libc = ctypes.CDLL(None, use_errno=True)

    def prctl(*args: int) -> int:
        rc = int(libc.prctl(*(ctypes.c_ulong(a) for a in args), ctypes.c_ulong(0),
                            ctypes.c_ulong(0)))
        if rc < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"prctl({args[0]}, {args[1]}): {os.strerror(e)}")
        return rc

    # Every capability the kernel knows: PR_CAPBSET_READ says EINVAL past the last one
    # (/proc/sys/kernel/cap_last_cap would say so too, but a unit's ProcSubset=pid hides it).
    known = []
    for cap in range(64):
        try:
            known.append((cap, prctl(_PR_CAPBSET_READ, cap, 0)))
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            break
    for cap, bounded in sorted(known, key=lambda c: c[0] == CAP_SETPCAP):
        if cap in keep or not bounded:
            continue
        try:
            prctl(_PR_CAPBSET_DROP, cap, 0)
        except OSError as e:
            if e.errno == errno.EPERM:
                raise OSError(e.errno, "cannot drop capabilities from the bounding set "
                              "without CAP_SETPCAP (add it to the unit's "
                              "CapabilityBoundingSet)") from None
            raise
    prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0)
    header = _Header(_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capget: {os.strerror(err)}")
    for word in (0, 1):
        mask = sum(1 << (cap % 32) for cap in keep if cap // 32 == word)
        mask &= data[word].permitted  # never ask for one we do not have
        data[word] = _Data(mask, mask, 0)
    if libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
