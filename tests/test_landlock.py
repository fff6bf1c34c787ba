"""The Landlock ruleset the root child asks for on each ABI, in the kernel's documented
numbers (include/uapi/linux/landlock.h), not taken from privileged/landlock.py: a kernel
refuses (EINVAL) a right or a field it does not know, and does not enforce one the child
forgets to ask for.  This kernel runs only its own ABI; the others are checked here."""

from __future__ import annotations

import errno
import os
import stat
import struct
import subprocess
import sys

import pytest

from privileged import landlock
from tests.helpers import REPO

# ABI -> (handled_access_fs, handled_access_net, scoped, size of struct landlock_ruleset_attr)
DOCUMENTED = {
    1: ((1 << 13) - 1, 0, 0, 8),  # execute ... make_sym
    2: ((1 << 14) - 1, 0, 0, 8),  # + refer
    3: ((1 << 15) - 1, 0, 0, 8),  # + truncate
    4: ((1 << 15) - 1, 0b11, 0, 16),  # + TCP bind, connect (a second field)
    5: ((1 << 16) - 1, 0b11, 0, 16),  # + ioctl_dev
    6: ((1 << 16) - 1, 0b11, 0b11, 24),  # + abstract Unix sockets, signals (a third field)
    7: ((1 << 16) - 1, 0b11, 0b11, 24),  # (audit flags only)
}


@pytest.mark.parametrize("version", sorted(DOCUMENTED))
def test_the_ruleset_asked_for_is_the_one_each_abi_documents(version, monkeypatch):
    asked: list[tuple[bytes, int]] = []

    def syscall(number: int, *args: object) -> int:
        if number == 444 and args[0] is None:  # the version query
            return version
        assert number == 444  # landlock_create_ruleset: nothing is restricted here
        attr, size = args[0], args[1]
        assert isinstance(attr, bytes) and isinstance(size, int)
        asked.append((attr, size))
        raise OSError(errno.EPERM, "stopped by the test")

    monkeypatch.setattr(landlock, "_syscall", syscall)
    with pytest.raises(OSError):
        landlock.restrict(None)
    ((attr, size),) = asked
    fs, net, scoped, documented_size = DOCUMENTED[version]
    assert (struct.unpack("QQQ", attr), size) == ((fs, net, scoped), documented_size)


@pytest.mark.parametrize(("err", "abi"), [
    (errno.ENOSYS, 0),  # a kernel built without it
    (errno.EOPNOTSUPP, 0),  # built in, disabled at boot
    (errno.EPERM, 0),  # a container's or service manager's filter refuses it
    (errno.EINVAL, None),  # anything else is an error, in one line
])
def test_a_kernel_without_landlock_is_abi_0_and_nothing_is_restricted(err, abi, monkeypatch):
    def syscall(number: int, *args: object) -> int:
        assert number == 444 and args[0] is None, "only the version query may be made"
        raise OSError(err, "refused by the test")

    monkeypatch.setattr(landlock, "_syscall", syscall)
    if abi is None:
        with pytest.raises(OSError, match="Landlock: Invalid argument") as refused:
            landlock.restrict(None)
        assert refused.value.errno == err
    else:
        assert landlock.abi() == abi
        assert landlock.restrict(None) == 0


def test_a_device_node_is_named_to_landlock_without_being_opened(workdir):
    """The rule for the device is added through an O_PATH descriptor: a node whose driver
    is absent (an unused major number) cannot be opened, yet is allowed."""
    node = os.path.join(workdir, "hv_vss")
    os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(4000, 0))
    with pytest.raises(OSError):
        os.close(os.open(node, os.O_RDONLY))
    restricted = subprocess.run(
        [sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
         "from privileged import landlock; print(landlock.restrict(sys.argv[2]))", REPO, node],
        capture_output=True, text=True, timeout=30, check=False)
    assert restricted.returncode == 0, restricted.stderr
    assert int(restricted.stdout) >= 1
