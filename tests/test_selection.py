"""privileged/selection.py and mounts_linux.py: what is frozen, what vetoes, in what order."""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privileged.child_config import CheckConfig, ChildConfig, FreezeConfig
from privileged.mounts_linux import LINUX, parse_mountinfo, unescape
from privileged.selection import Mount, Verdict, glob_match, select_targets, under


def mnt(path: str, fstype: str = "ext4", key: str | None = None, *, ro: bool = False,
        local: bool = True, pseudo: bool = False, backing: str | None = None) -> Mount:
    return Mount(path, fstype, f"/dev/{fstype}", readonly=ro, local=local, pseudo=pseudo,
                 fs_key=key or f"k{path}", backing_file=backing)


def cfg(only: tuple[str, ...] = (), exclude: tuple[str, ...] = (), mode: str = "default",
        zfs: str = "ignore") -> ChildConfig:
    return ChildConfig(freeze=FreezeConfig(only=only, exclude=exclude),
                       check=CheckConfig(mode=mode, zfs=zfs))


def verdicts(mounts: list[Mount], c: ChildConfig) -> dict[str, Verdict]:
    return {d.mount.mountpoint: d.verdict for d in select_targets(mounts, c, LINUX).decisions}


def test_under_respects_path_boundaries():
    assert under("/devel", "/dev") is False
    assert under("/dev/shm", "/dev") is True
    assert under("/dev", "/dev") is True
    assert under("/anything", "/") is True


def test_classification_table():
    mounts = [
        mnt("/", "ext4"), mnt("/boot/efi", "vfat"), mnt("/proc", "proc", pseudo=True),
        mnt("/tmp", "tmpfs", pseudo=True), mnt("/srv/nfs", "nfs4", local=False),
        mnt("/ro", "xfs", ro=True), mnt("/data", "xfs"), mnt("/tank", "zfs"),
        mnt("/win", "ntfs3"),
    ]
    assert verdicts(mounts, cfg()) == {
        "/": Verdict.FREEZE, "/boot/efi": Verdict.CRASH_ONLY, "/proc": Verdict.IGNORE,
        "/tmp": Verdict.IGNORE, "/srv/nfs": Verdict.IGNORE, "/ro": Verdict.IGNORE,
        "/data": Verdict.FREEZE, "/tank": Verdict.CRASH_ONLY, "/win": Verdict.VETO,
    }
    strict = verdicts(mounts, cfg(mode="strict"))
    assert strict["/boot/efi"] is Verdict.VETO and strict["/tank"] is Verdict.VETO
    assert strict["/tmp"] is Verdict.IGNORE  # pseudo filesystems never veto
    assert verdicts(mounts, cfg(zfs="veto"))["/tank"] is Verdict.VETO


def test_only_and_exclude_are_choices_not_vetoes():
    mounts = [mnt("/"), mnt("/a"), mnt("/b"), mnt("/win", "ntfs3"), mnt("/scratch/x")]
    sel = select_targets(mounts, cfg(only=("/a", "/b")), LINUX)
    assert [m.mountpoint for m in sel.targets] == ["/b", "/a"]
    assert sel.veto_reason() is None  # /win is outside `only`: not our business
    sel = select_targets(mounts, cfg(exclude=("/scratch/*", "/win")), LINUX)
    assert sel.veto_reason() is None
    assert "/scratch/x" not in [m.mountpoint for m in sel.targets]


def test_missing_only_entry_vetoes():
    sel = select_targets([mnt("/a")], cfg(only=("/a", "/gone")), LINUX)
    assert sel.missing_only == ["/gone"]
    assert sel.veto_reason() == ("/gone", "listed in [freeze] only but not a freezable mount")


def test_same_filesystem_twice_is_frozen_once():
    mounts = [mnt("/data", "btrfs", "0:39"), mnt("/home", "btrfs", "0:39"), mnt("/x", "xfs")]
    sel = select_targets(mounts, cfg(), LINUX)
    assert sorted(m.mountpoint for m in sel.targets) == ["/data", "/x"]
    # and `only` may name either mountpoint of it
    sel = select_targets(mounts, cfg(only=("/home",)), LINUX)
    assert [m.mountpoint for m in sel.targets] == ["/home"] and not sel.missing_only


def test_order_nested_first_loop_backed_first_root_last():
    mounts = [
        mnt("/"),
        mnt("/var"),
        mnt("/var/lib"),  # nested in /var: before /var
        mnt("/images/disk", "ext4", backing="/var/img/disk.img"),  # its file lives on /var
        mnt("/srv"),
    ]
    order = [m.mountpoint for m in select_targets(mounts, cfg(), LINUX).targets]
    assert order[-1] == "/"
    assert order.index("/var/lib") < order.index("/var")
    assert order.index("/images/disk") < order.index("/var")
    assert order.index("/srv") < order.index("/")


def test_levels_freeze_what_depends_on_nothing_together_and_root_alone_last():
    mounts = [
        mnt("/"),
        mnt("/var"),
        mnt("/var/lib"),  # nested in /var
        mnt("/var/lib/deep"),  # nested in /var/lib: two levels below /var
        mnt("/images/disk", "ext4", backing="/var/img/disk.img"),  # its file lives on /var
        mnt("/srv"),
        mnt("/home"),
    ]
    sel = select_targets(mounts, cfg(), LINUX)
    levels = [sorted(sel.targets[i].mountpoint for i in lv) for lv in sel.levels]
    assert levels == [["/home", "/images/disk", "/srv", "/var/lib/deep"], ["/var/lib"],
                      ["/var"], ["/"]]
    # every index once, and each level in freeze order
    flat = [i for lv in sel.levels for i in lv]
    assert sorted(flat) == list(range(len(sel.targets)))
    assert all(lv == sorted(lv) for lv in sel.levels)


def test_levels_without_dependencies_are_one_level():
    mounts = [mnt(f"/data/{i}") for i in range(5)]
    sel = select_targets(mounts, cfg(), LINUX)
    assert sel.levels == [list(range(5))]


def test_ties_go_newest_mount_first():
    mounts = [mnt("/"), mnt("/a"), mnt("/b"), mnt("/c")]
    assert [m.mountpoint for m in select_targets(mounts, cfg(), LINUX).targets] == \
        ["/c", "/b", "/a", "/"]


SAMPLE = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
43 27 0:39 / /tmp/kt/m rw,relatime - btrfs /dev/loop0 rw,subvolid=5,subvol=/
44 27 0:39 /sv /tmp/kt/s rw,relatime - btrfs /dev/loop0 rw,subvolid=256,subvol=/sv
50 27 7:1 / /mnt/with\\040space rw shared:5 - ext4 /dev/loop1 rw
51 27 7:2 / /mnt/ro ro,relatime - xfs /dev/loop2 rw
52 27 7:3 / /mnt/sbro rw,relatime - xfs /dev/loop3 ro
60 27 0:50 / /srv/share rw - nfs4 server:/export rw
61 27 0:51 / /srv/smb rw - cifs //server/share rw
62 27 0:52 / /srv/nfs42 rw - nfs4.2 server:/other rw
63 27 7:0 / /mnt/by-uuid rw - ext4 UUID=0c2d7a3e rw
this line is garbage
"""


def test_a_source_under_dev_that_is_gone_is_read_as_no_block_device():
    """A mount whose source names a /dev node that is not there (a device unplugged, a
    loop device detached) is still read, as a filesystem without a block device."""
    (m,) = parse_mountinfo("70 27 0:60 / /mnt/gone rw - btrfs /dev/hvvss-gone-device rw\n")
    assert (m.mountpoint, m.fs_key, m.pseudo) == ("/mnt/gone", "0:60", True)


def test_parse_mountinfo_fields():
    mounts = {m.mountpoint: m for m in parse_mountinfo(SAMPLE)}
    assert set(mounts) == {"/proc", "/", "/tmp/kt/m", "/tmp/kt/s", "/mnt/with space",
                           "/mnt/ro", "/mnt/sbro", "/srv/share", "/srv/smb", "/srv/nfs42",
                           "/mnt/by-uuid"}
    assert mounts["/tmp/kt/m"].fs_key == mounts["/tmp/kt/s"].fs_key == "0:39"
    assert mounts["/mnt/with space"].fstype == "ext4"  # optional field "shared:5" skipped
    # read-only is the superblock's word: a read-only view (a bind mount, or systemd's
    # ProtectSystem=strict namespace) of a writable filesystem must still be frozen
    assert not mounts["/mnt/ro"].readonly and mounts["/mnt/sbro"].readonly
    assert mounts["/proc"].pseudo
    # a block filesystem is told by its device number where it has one (7:0, whatever the
    # source says), by its source where the number is anonymous (btrfs: 0:39 on a loop device)
    assert not mounts["/mnt/by-uuid"].pseudo and not mounts["/tmp/kt/m"].pseudo
    # network filesystems: those listed, and any nfs variant a newer kernel names
    assert not mounts["/srv/share"].local and not mounts["/srv/smb"].local
    assert not mounts["/srv/nfs42"].local and mounts["/"].local


def test_unescape():
    assert unescape(r"/a\040b\011c\012d\134e") == "/a b\tc\nd\\e"
    assert unescape("/plain") == "/plain"
    assert unescape("/trailing\\04") == "/trailing\\04"
    assert unescape(r"/ends\040") == "/ends "  # an escape as the last three characters


def test_this_machines_root_is_a_candidate_without_only():
    """Why every test sets [freeze] only: without it, / itself would be frozen."""
    from privileged.freeze_linux import LinuxFreezer

    sel = select_targets(LinuxFreezer().mounts(), cfg(), LINUX)
    assert "/" in [m.mountpoint for m in sel.targets]
    assert select_targets(LinuxFreezer().mounts(), cfg(only=("/nonexistent",)), LINUX).targets == []


BRACKETS = ["[!a-c]", "[!a-c-e]", "[z-a]", "[z-a!]", "[c-a-e]", "[a-c-e]", "[!-x]", "[a-]",
            "[-a]", "[!]", "[!!]", "[]-a]", "[!z-a-c]", "[b-a-c-d]", "[a-cz-x]", "[!c-a]",
            "[ab-]", "[x-z-a]", "[z-a-c]", "[e-c-a-x]", "[!e-c-a]", "[a-a]", "[!b-b-]",
            "[b-a!-b]", "[--!!-a]"]


@pytest.mark.parametrize("pattern", BRACKETS)
def test_bracket_ranges_read_as_fnmatch_reads_them(pattern):
    """Ranges, reversed ranges (dropped with their ends), hyphens that are themselves and
    negation, every one of them over the characters around it: the hypothesis test below
    seldom draws these."""
    for name in [*"-!abcdexyz]", "ab", ""]:
        assert glob_match(name, pattern) == fnmatch.fnmatchcase(name, pattern), (name, pattern)


@settings(max_examples=3000, deadline=None)
@given(st.text("ab-!]*?[/\\", max_size=9), st.text("ab-!]/[\\", max_size=8))
def test_exclude_globs_match_as_fnmatch_does(pattern, name):
    """[freeze] exclude is matched without the re module fnmatch needs; the same answers."""
    assert glob_match(name, pattern) == fnmatch.fnmatchcase(name, pattern)
