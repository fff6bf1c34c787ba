"""The child's state directory: the crash record names exactly what a successor must thaw,
and the directory the check passed is the one the records go to."""

from __future__ import annotations

import errno
import os

import pytest

from privileged import statefile
from privileged.freeze_linux import LinuxFreezer
from privileged.freezer import FreezeFailed
from privileged.mounts import Mount
from privileged.statefile import StateDir


def test_a_target_frozen_by_someone_else_is_dropped_from_the_crash_record(workdir):
    """A successor thaws what the record names: never a filesystem that was not ours."""
    state = StateDir(os.path.join(workdir, "state"))
    state.open()
    state.write([("7:1", "/srv/a"), ("7:2", "/srv/b with space")])
    state.drop("7:2")
    assert state.read() == [("7:1", "/srv/a")]
    state.clear()
    assert state.read() == []


def test_a_record_a_crash_tore_names_nothing_and_does_not_spoil_the_next_one(workdir):
    """A child killed in the middle of writing the record leaves a line without its end:
    its successor reads nothing from it, and the next FREEZE's record replaces it, so that
    its first target is named as it is."""
    state = StateDir(os.path.join(workdir, "state"))
    state.open()
    with open(os.path.join(workdir, "state", statefile.RECORD), "ab") as f:
        f.write(b"7:9 /srv/torn-in-the-midd")
    assert state.read() == []
    state.write([("7:1", "/srv/a"), ("7:2", "/srv/b")])
    assert state.read() == [("7:1", "/srv/a"), ("7:2", "/srv/b")]
    with open(os.path.join(workdir, "state", statefile.RECORD), "ab") as f:
        f.write(b"-7:3 /srv/c\n")  # a drop carries no path: this line names nothing
    assert state.read() == [("7:1", "/srv/a"), ("7:2", "/srv/b")]


@pytest.mark.parametrize(("mode", "uid"), [(0o750, 0), (0o700, 65534)])
def test_a_state_directory_others_can_enter_or_own_is_refused(workdir, mode, uid):
    """The crash record names what root will thaw: its directory must be root's, 0700."""
    path = os.path.join(workdir, "state")
    os.mkdir(path)
    os.chmod(path, mode)
    os.chown(path, uid, uid)
    with pytest.raises(statefile.StateError, match="must be a root-owned directory"):
        StateDir(path).open()


def test_a_state_directory_swapped_for_a_symlink_after_its_check_is_refused(workdir,
                                                                           monkeypatch):
    """Checked, then swapped for a symlink to a directory the records must not reach before
    the open: the open does not follow it, and nothing is written there."""
    path, elsewhere = os.path.join(workdir, "state"), os.path.join(workdir, "elsewhere")
    os.mkdir(path, 0o700)
    os.mkdir(elsewhere, 0o700)
    checked = statefile.directories_reason

    def check_then_swap(real: str) -> str | None:
        reason = checked(real)
        os.rename(path, path + ".old")
        os.symlink(elsewhere, path)
        return reason

    monkeypatch.setattr(statefile, "directories_reason", check_then_swap)
    with pytest.raises(OSError):
        StateDir(path).open()
    assert os.listdir(elsewhere) == []


def test_a_recovery_that_cannot_open_its_filesystem_says_why_and_thaws_nothing(monkeypatch):
    """Three tries, each refused as a FREEZE's open would be (the path led elsewhere each
    time, say): the target is left as it is, and the note says why."""
    freezer = LinuxFreezer()
    root = freezer.mounts()[0]
    tries: list[str] = []

    def refuse(targets: list[Mount]) -> list[int]:
        tries.append(targets[0].mountpoint)
        raise FreezeFailed(targets[0].mountpoint, errno.EXDEV, "the path now leads elsewhere")

    monkeypatch.setattr(freezer, "open", refuse)
    assert freezer.recover([(root.fs_key, root.mountpoint)]) == [
        f"{root.mountpoint} ({root.fs_key}): the path now leads elsewhere; left as it is"]
    assert tries == [root.mountpoint] * 3
