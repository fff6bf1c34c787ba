"""tools/root_loc.py counts what the root child really runs, and the child keeps to its figures."""

from __future__ import annotations

import os

from tests.helpers import child_conversation_modules
from tools import root_loc


def test_the_real_child_loads_nothing_the_count_leaves_out(workdir, make_fs, monkeypatch):
    """The count imports privileged.child; the real child, having served a whole
    conversation, has loaded exactly those modules of ours and nothing the count misses."""
    fs = make_fs("ext4")
    hello, ran = child_conversation_modules(workdir, fs.mountpoint, monkeypatch)
    assert hello.devices == (os.stat(fs.mountpoint).st_dev,)  # what the parent checks against
    counted = {name for name, _ in root_loc.child_sets()["linux"]}
    assert sorted(ran - counted) == []
    assert sorted(m for m in counted - ran if m.startswith("privileged")) == []


def test_each_platform_s_count_holds_that_platform_s_modules():
    sets = {platform: {name for name, _ in modules}
            for platform, modules in root_loc.child_sets().items()}
    linux_only = {"privileged.freeze_linux", "privileged.mounts_linux", "privileged.sandbox",
                  "privileged.seccomp", "privileged.landlock", "privileged.syscall_table"}
    freebsd_only = {"privileged.freeze_freebsd", "privileged.mounts_freebsd",
                    "privileged.statfs_freebsd", "privileged.ufs_kernel"}
    assert linux_only <= sets["linux"] and not freebsd_only & sets["linux"]
    assert freebsd_only <= sets["freebsd"] and not linux_only & sets["freebsd"]
    for names in sets.values():  # never the demo's pretend freezer, never the parent's code
        assert not {"privileged.freeze_memory", "privileged.wire", "privileged.config",
                    "privileged.trust"} & names
        assert not [n for n in names if n.split(".")[0] == "agent"]


def test_the_root_child_keeps_within_its_figures():
    """The goals that are met are held; the code lines may not grow past today's count
    (SECURITY.md, "Lines of code that run as root")."""
    for platform, modules in root_loc.child_sets().items():
        stdlib, _, third = root_loc.theirs(modules)
        assert len(stdlib) <= root_loc.CHILD_STDLIB_MODULES, (platform, stdlib)
        assert third == [], platform
        lines = sum(root_loc.ours(modules, "privileged").values())
        assert lines <= root_loc.CHILD_LINES_TODAY[platform], (platform, lines)
    memory = root_loc.child_memory()
    assert memory["VmHWM"] <= root_loc.CHILD_RSS_KIB, memory
