"""How root reaches the paths it uses: the directories above them judged as OpenSSH's
StrictModes judges them (privileged/safe_path.py, trust.py), a mountpoint opened without
following a link (freeze_linux.open_nofollow), the device REOPEN opens (device.py)."""

from __future__ import annotations

import errno
import fcntl
import os
import socket

import pytest

from privileged import device
from privileged.device import identify, open_device
from privileged.freeze_linux import open_nofollow
from privileged.safe_path import directories_reason
from privileged.trust import untrusted_reason, untrusted_tree_reason


def links_to(real: str) -> tuple[str, str]:
    """Two symlinks beside `real`, leading to it: one root's, one a user's (uid 65534)."""
    roots, users = real + "-roots", real + "-users"
    os.symlink(real, roots)
    os.symlink(real, users)
    os.lchown(users, 65534, 65534)
    return roots, users


def test_a_symlink_on_the_way_is_judged_by_its_owner(workdir):
    """For `[freeze] only` (links=True): a symlink root owns is as safe as a directory root
    owns; one a user owns lets that user point the path elsewhere."""
    real = os.path.join(workdir, "real")
    os.mkdir(real, 0o755)
    roots, users = links_to(real)
    assert directories_reason(os.path.join(roots, "mnt"), links=True) is None
    assert directories_reason(os.path.join(users, "mnt"), links=True) == (
        f"{users} is a symlink owned by uid 65534, not root")
    assert directories_reason(os.path.join(users, "mnt")) == f"{users} is not a directory"


def test_a_file_named_through_a_symlink_is_trusted_only_if_root_owns_the_link(workdir):
    """untrusted_reason (the config, the device, the sockets' directories) judges the path
    as given as well as where it leads: whoever owns a symlink on the way can repoint it."""
    real = os.path.join(workdir, "real")
    os.mkdir(real, 0o755)
    with open(os.path.join(real, "agent.toml"), "w", encoding="utf-8"):
        pass
    roots, users = links_to(real)
    assert untrusted_reason(os.path.join(roots, "agent.toml")) is None
    assert untrusted_reason(os.path.join(users, "agent.toml")) == (
        f"{users} is a symlink owned by uid 65534, not root")


def test_a_directory_another_system_account_owns_is_not_trusted(workdir):
    """Only root (and whoever runs the check) may own the directories above a path root
    uses: not bin, daemon or any other system account."""
    above = os.path.join(workdir, "daemon-s")
    os.mkdir(above, 0o755)
    os.chown(above, 1, 1)
    assert directories_reason(os.path.join(above, "state")) == \
        f"directory {above} is owned by uid 1, not root"


@pytest.mark.parametrize("path", ["/", "/usr"])
def test_the_descriptor_a_target_is_opened_with_can_be_frozen(path):
    """open_nofollow walks with O_PATH descriptors, which FIFREEZE refuses (EBADF); the
    last one, the root's own included when the target is /, is a real read-only open."""
    fd = open_nofollow(path)
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        assert not flags & os.O_PATH and flags & os.O_ACCMODE == os.O_RDONLY
        assert os.path.samestat(os.fstat(fd), os.stat(path))
    finally:
        os.close(fd)


def test_open_nofollow_follows_no_symlink_and_opens_only_a_directory(workdir):
    """A symlink at the end of a target's path, or on the way, is refused, root's own
    included: the mount table names the path, and only that path is frozen (ENOTDIR:
    O_DIRECTORY with O_NOFOLLOW meets the link itself).  A file is refused too."""
    real = os.path.join(workdir, "real")
    os.mkdir(real, 0o755)
    with open(os.path.join(real, "file"), "w", encoding="utf-8"):
        pass
    os.mkdir(os.path.join(real, "sub"), 0o755)
    roots, _ = links_to(real)
    for path in (roots, os.path.join(roots, "sub"), os.path.join(real, "file")):
        with pytest.raises(OSError) as refused:
            os.close(open_nofollow(path))
        assert refused.value.errno == errno.ENOTDIR, path
    os.close(open_nofollow(os.path.join(real, "sub")))


def test_a_file_another_system_account_owns_is_not_trusted(workdir):
    """The file itself too, not only its directories: bin (uid 1) is not root."""
    path = os.path.join(workdir, "agent.toml")
    with open(path, "w", encoding="utf-8"):
        pass
    os.chown(path, 1, 1)
    assert untrusted_reason(path) == f"{path} is owned by uid 1, not root"


def test_a_path_that_cannot_be_looked_at_is_not_trusted(workdir):
    """What cannot be examined is not trusted: the reason names the path and the error."""
    missing = os.path.join(workdir, "gone", "agent.toml")
    assert untrusted_reason(missing) == f"{missing}: No such file or directory"


def test_a_simulator_socket_nobody_listens_on_is_an_error_not_a_descriptor(workdir):
    """REOPEN's open of the device (privileged/device.py): with the simulator gone, the
    connect's error reaches the parent, and no descriptor, open or closed, is handed over."""
    path = os.path.join(workdir, "simulator.sock")
    gone = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    gone.bind(path)  # bound, never listening: connect is refused
    try:
        with pytest.raises(ConnectionRefusedError):
            open_device(path, identify(path))
    finally:
        gone.close()


def test_a_tree_check_leaves_out_the_directories_it_is_told_to_skip(workdir):
    """The install check skips what Python writes on its own (the standard library's
    bytecode caches, say); everything else below the top is judged."""
    top = os.path.join(workdir, "tree")
    os.makedirs(os.path.join(top, "skipped"), 0o755)
    loose = os.path.join(top, "skipped", "loose.py")
    with open(loose, "w", encoding="utf-8"):
        pass
    os.chmod(loose, 0o666)
    assert untrusted_tree_reason(top, frozenset({"skipped"})) is None
    assert untrusted_tree_reason(top) == (
        f"{loose} is writable by group or others (mode 0666)")


def test_where_o_path_is_missing_the_device_is_opened_by_name_and_left_blocking(
        monkeypatch, workdir):
    """The branch for systems without O_PATH (FreeBSD): the node is opened with O_NOFOLLOW and
    O_NONBLOCK (a symlink is refused, no open waits), checked against what was expected, and
    made blocking again, since the child's reads of the device wait for the host."""
    monkeypatch.setattr(device, "LINUX", False)
    fd = open_device("/dev/null", identify("/dev/null"))
    try:
        assert os.get_blocking(fd)
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR  # REOPEN writes
        assert os.path.samestat(os.fstat(fd), os.stat("/dev/null"))
    finally:
        os.close(fd)
    link = os.path.join(workdir, "hv_fsvss_dev")
    os.symlink("/dev/null", link)
    with pytest.raises(OSError) as refused:
        open_device(link, identify("/dev/null"))
    assert refused.value.errno == errno.ENODEV  # the link itself is no device
    # Swapped for the link between the check and the open (staged: the check is shown the
    # node): the open follows no symlink.
    lstat = os.lstat
    with monkeypatch.context() as staged, pytest.raises(OSError) as refused:
        staged.setattr(device.os, "lstat", lambda p: lstat("/dev/null" if p == link else p))
        open_device(link, identify("/dev/null"))
    assert refused.value.errno == errno.ELOOP
    with pytest.raises(OSError) as refused:
        open_device("/dev/zero", identify("/dev/null"))
    assert refused.value.errno == errno.ESTALE


def test_a_symlink_in_the_tree_is_judged_by_where_it_leads(workdir):
    """A root-owned link in the installed tree to a file a user owns: the user's file is
    what would be imported as root, so the tree is refused."""
    top = os.path.join(workdir, "tree")
    os.makedirs(top, 0o755)
    theirs = os.path.join(workdir, "theirs.py")
    with open(theirs, "w", encoding="utf-8"):
        pass
    os.chown(theirs, 65534, 65534)
    os.symlink(theirs, os.path.join(top, "module.py"))
    assert untrusted_tree_reason(top) == f"{theirs} is owned by uid 65534, not root"
