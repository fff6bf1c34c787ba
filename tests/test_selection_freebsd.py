"""The CHECK policy on FreeBSD, one row per kind of mount, in both modes.

Mounts go the whole way a real one does: getfsstat records (from the model),
privileged.mounts_freebsd, then privileged.selection with the FreeBSD
platform table.  CHECK and FREEZE both call select_targets, so these rows
are what CHECK promises and what FREEZE then does.
"""

from __future__ import annotations

import pytest

from privileged.config import ChildConfig, parse_child_sections
from privileged.mounts_freebsd import FREEBSD, parse_mounts
from privileged.selection import Mount, Verdict, classify, select_targets
from tests.ufs_model import MNT_LOCAL, MNT_RDONLY, ModelMount, UfsModel

pytestmark = pytest.mark.freebsd_model

NETWORK = 0  # no MNT_LOCAL


def mount(mountpoint: str, fstype: str = "ufs", flags: int = MNT_LOCAL, n: int = 7) -> Mount:
    model = UfsModel([ModelMount(mountpoint, bytes([n]) + bytes(7), fstype, "src", flags)])
    (m,) = parse_mounts(model.getfsstat())
    return m


def config(**sections: dict[str, object]) -> ChildConfig:
    return parse_child_sections(sections)


DEFAULT = config()
STRICT = config(check={"mode": "strict"})
ZFS_VETO = config(check={"zfs": "veto"})

VE, IG, CR, FR = Verdict.VETO, Verdict.IGNORE, Verdict.CRASH_ONLY, Verdict.FREEZE

#   mount                                               default   zfs=veto  strict
TABLE = [
    (("/", "ufs"),                                      FR,       FR,       FR),
    (("/", "ufs", MNT_LOCAL | MNT_RDONLY),              IG,       IG,       IG),
    (("/dev", "devfs"),                                 IG,       IG,       IG),
    (("/dev/fd", "fdescfs"),                            IG,       IG,       IG),
    (("/devel", "ufs"),                                 FR,       FR,       FR),  # stock: skipped
    (("/devel", "tmpfs"),                               IG,       IG,       VE),  # stock: skipped
    (("/tmp", "tmpfs"),                                 IG,       IG,       VE),
    (("/proc", "procfs"),                               IG,       IG,       VE),
    (("/compat/linux/proc", "linprocfs"),               IG,       IG,       VE),
    (("/jail/www/usr/home", "nullfs"),                  IG,       IG,       VE),
    (("/net/share", "nfs", NETWORK),                    IG,       IG,       VE),
    (("/net/smb", "smbfs", NETWORK),                    IG,       IG,       VE),
    (("/zroot/data", "zfs"),                            CR,       VE,       VE),
    (("/", "zfs"),                                      CR,       VE,       VE),
    (("/boot/efi", "msdosfs"),                          CR,       CR,       VE),
    (("/mnt/linux", "ext2fs"),                          VE,       VE,       VE),
    (("/cdrom", "cd9660", MNT_LOCAL | MNT_RDONLY),      IG,       IG,       IG),
]


@pytest.mark.parametrize("spec,default,zfs_veto,strict", TABLE,
                         ids=[f"{s[0]} {s[1]}" for s, *_ in TABLE])
def test_policy_table(spec, default, zfs_veto, strict):
    m = mount(*spec)
    for cfg, want in ((DEFAULT, default), (ZFS_VETO, zfs_veto), (STRICT, strict)):
        d = classify(m, cfg, FREEBSD)
        assert d.verdict is want, (cfg.check, d.reason)


def test_reasons_say_which_and_why():
    assert classify(mount("/mnt/linux", "ext2fs"), DEFAULT, FREEBSD).reason == \
        "read-write local ext2fs filesystem cannot be frozen"
    assert classify(mount("/tmp", "tmpfs"), STRICT, FREEBSD).reason == (
        'read-write tmpfs filesystem ([check] mode = "strict": only ufs may be mounted '
        "read-write, as in the stock daemon)")
    assert classify(mount("/zroot", "zfs"), DEFAULT, FREEBSD).reason == \
        "ZFS datasets get crash consistency only (copy-on-write keeps them intact)"
    assert classify(mount("/devel", "tmpfs"), DEFAULT, FREEBSD).reason == \
        "pseudo filesystem (tmpfs)"


def test_strict_mode_still_honours_the_operators_exclusions():
    strict_but = config(check={"mode": "strict"}, freeze={"exclude": ["/tmp", "/net/*"]})
    assert classify(mount("/tmp", "tmpfs"), strict_but, FREEBSD).verdict is Verdict.IGNORE
    assert classify(mount("/net/share", "nfs", NETWORK), strict_but, FREEBSD).verdict is \
        Verdict.IGNORE
    assert classify(mount("/proc", "procfs"), strict_but, FREEBSD).verdict is Verdict.VETO


def typical_machine() -> list[Mount]:
    """UFS root and /var, a ZFS pool, tmpfs on /tmp, devfs, procfs: what users have."""
    model = UfsModel([
        ModelMount("/", bytes([1]) + bytes(7)),
        ModelMount("/dev", bytes([2]) + bytes(7), "devfs"),
        ModelMount("/var", bytes([3]) + bytes(7)),
        ModelMount("/tmp", bytes([4]) + bytes(7), "tmpfs"),
        ModelMount("/tank", bytes([5]) + bytes(7), "zfs"),
        ModelMount("/tank/db", bytes([6]) + bytes(7), "zfs"),
        ModelMount("/proc", bytes([7]) + bytes(7), "procfs"),
        ModelMount("/var/db", bytes([8]) + bytes(7)),
    ])
    return parse_mounts(model.getfsstat())


def test_the_default_backs_up_a_typical_machine_the_stock_rule_never_would():
    sel = select_targets(typical_machine(), DEFAULT, FREEBSD)
    assert sel.veto_reason() is None
    assert [m.mountpoint for m in sel.targets] == ["/var/db", "/var", "/"]  # inner first, / last
    assert [d.mount.mountpoint for d in sel.of(Verdict.CRASH_ONLY)] == ["/tank", "/tank/db"]

    strict = select_targets(typical_machine(), STRICT, FREEBSD)
    assert strict.veto_reason() == ("/tmp", 'read-write tmpfs filesystem ([check] mode = '
                                    '"strict": only ufs may be mounted read-write, as in the '
                                    "stock daemon)")
    assert [d.mount.mountpoint for d in strict.of(Verdict.VETO)] == \
        ["/tmp", "/tank", "/tank/db", "/proc"]
