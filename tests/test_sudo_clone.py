"""`sudo make demo` and `sudo make test` in a clone that an ordinary user owns.

Root must not run code someone else can change (the agent refuses to), so make works
in a root-owned copy of the clone; nothing in the clone may become root's.  Run for
real: a clone owned by an unprivileged account, the real Makefile, sudo, pip, the demo
on loop devices, and a part of this suite.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess

import pytest

from tests.helpers import REPO

OWNER = "daemon"  # an account that is not root; any would do
NOT_COPIED = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", ".*_cache",
                                    ".hypothesis", "__pycache__")
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
       "LANG": "C.UTF-8"}


def clone_owned_by(owner: str, where: str) -> str:
    clone = os.path.join(where, "hv-vss-agent")
    shutil.copytree(REPO, clone, ignore=NOT_COPIED, symlinks=True)
    pw = pwd.getpwnam(owner)
    for dirpath, dirnames, filenames in os.walk(clone):
        for name in [".", *dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), pw.pw_uid, pw.pw_gid)
    return clone


def roots_files(top: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            if os.lstat(path).st_uid == 0:
                found.append(path)
    return found


def sudo_make(clone: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sudo", "make", *args], cwd=clone, env=ENV, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sudo_make_demo_and_test_in_a_users_clone(workdir):
    clone = clone_owned_by(OWNER, workdir)
    stage_root = os.path.join(workdir, "stage")  # the default is /var/tmp/hv-vss-agent-root
    where = f"STAGE_ROOT={stage_root}"

    demo = sudo_make(clone, "demo", where)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    first = demo.stdout.splitlines()[0]
    assert first.startswith(f"make: {clone} is {OWNER}'s: as root, make works in a "
                            f"root-owned copy, {stage_root}/hv-vss-agent-"), first
    assert "Real: the filesystems, the freezes, the privilege split." in demo.stdout
    assert "OK: 3 cycle(s)" in demo.stdout
    assert roots_files(clone) == []

    test = sudo_make(clone, "test", where, "TESTS=tests/test_config.py")
    assert test.returncode == 0, test.stdout + test.stderr
    assert " passed" in test.stdout.splitlines()[-1]
    assert roots_files(clone) == []
    assert not os.path.exists(os.path.join(clone, ".venv"))

    [stage] = [os.path.join(stage_root, d) for d in os.listdir(stage_root) if d != "pip-cache"]
    assert os.stat(stage).st_uid == 0 and os.path.isdir(os.path.join(stage, ".venv"))
    assert roots_files(stage) and not [p for p in os.listdir(stage)
                                       if os.lstat(os.path.join(stage, p)).st_uid != 0]

    clean = sudo_make(clone, "clean", where)
    assert clean.returncode == 0, clean.stderr
    assert not os.path.exists(stage)
    assert os.path.isfile(os.path.join(clone, "Makefile")) and roots_files(clone) == []


def test_a_staging_directory_someone_else_made_is_refused(workdir):
    """The default lives under /var/tmp, where anyone could make it first."""
    clone = clone_owned_by(OWNER, workdir)
    theirs = os.path.join(workdir, "theirs")
    os.mkdir(theirs)
    pw = pwd.getpwnam(OWNER)
    os.chown(theirs, pw.pw_uid, pw.pw_gid)
    r = sudo_make(clone, "demo", f"STAGE_ROOT={theirs}", timeout=120)
    assert r.returncode != 0
    assert f"make: {theirs} is not root's alone: remove it, or choose another with " \
           "STAGE_ROOT=DIR" in r.stderr.splitlines()
    assert "Traceback" not in r.stderr
    assert os.listdir(theirs) == [] and roots_files(clone) == []


def test_files_go_back_into_the_clone_as_its_owner_never_through_its_symlinks(workdir):
    """`sudo make bench` writes BENCHMARKS.md back: as the clone's owner, so a symlink
    the owner planted cannot make root overwrite a file of root's."""
    clone = clone_owned_by(OWNER, workdir)
    stage = os.path.join(workdir, "stage")
    os.makedirs(os.path.join(stage, "bench", "out"))
    for name in ("BENCHMARKS.md", "bench/out/scale.png"):
        with open(os.path.join(stage, name), "w", encoding="utf-8") as f:
            f.write("new figures\n")
    precious = os.path.join(workdir, "precious")
    with open(precious, "w", encoding="utf-8") as f:
        f.write("root's\n")
    os.chmod(precious, 0o644)
    os.makedirs(os.path.join(clone, "bench", "out"), exist_ok=True)
    link = os.path.join(clone, "bench", "out", "scale.png")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(precious, link)
    r = subprocess.run(["sh", os.path.join(REPO, "tools", "root_copy.sh"), "back", clone, stage,
                        "BENCHMARKS.md", "bench/out/scale.png"], capture_output=True, text=True,
                       timeout=30, check=False)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    with open(precious, encoding="utf-8") as f:
        assert f.read() == "root's\n"
    bench = os.path.join(clone, "BENCHMARKS.md")
    with open(bench, encoding="utf-8") as f:
        assert f.read() == "new figures\n"
    assert os.stat(bench).st_uid == pwd.getpwnam(OWNER).pw_uid
