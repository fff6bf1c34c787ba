"""FreeBSD Capsicum for the parent, against a model of the kernel (no FreeBSD here).

The calls go through LibcCapsicum's real ctypes code into C function
pointers backed by tests/capsicum_model.py; the model then says what the
kernel would allow on the descriptor.  SECURITY.md says this was not run on
FreeBSD.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest

from agent import sandbox, sandbox_freebsd
from agent.kernel.freebsd_wire import IOCHVVSSREAD, IOCHVVSSWRITE
from agent.sandbox_freebsd import (
    DEVICE_RIGHTS,
    SIMULATOR_RIGHTS,
    LibcCapsicum,
    enter_capability_mode,
    limit_device,
    rights_words,
)
from privileged.seccomp import SandboxError
from tests.capsicum_model import ECAPMODE, ENOTCAPABLE, CapsicumKernel

pytestmark = pytest.mark.freebsd_model

FIONBIO = 0x8004667E  # FreeBSD _IOW('f', 126, int)


@pytest.fixture
def device():
    fd = os.open("/dev/null", os.O_RDWR)  # a character device, as /dev/hv_fsvss_dev is
    yield fd
    os.close(fd)


def test_rights_words_match_capsicum_h():
    # CAPRIGHT(idx, bit) = (1 << (57 + idx)) | bit; CAP_IOCTL = CAPRIGHT(1, 0x80),
    # CAP_EVENT = CAPRIGHT(1, 0x20), CAP_FSTAT = CAPRIGHT(0, 0x80000)
    assert rights_words(DEVICE_RIGHTS) == (0x0200000000080000, 0x04000000000000A0)
    assert rights_words(()) == (0x0200000000000000, 0x0400000000000000)  # CAP_NONE
    assert (IOCHVVSSREAD, IOCHVVSSWRITE) == (0x40407602, 0x80407603)


def test_device_keeps_only_the_two_vss_ioctls_then_capability_mode(device):
    kernel = CapsicumKernel()
    enter_capability_mode(device, LibcCapsicum(kernel.libc()))
    assert kernel.in_mode
    assert kernel.rights[device] == rights_words(DEVICE_RIGHTS)
    assert kernel.ioctls[device] == (IOCHVVSSREAD, IOCHVVSSWRITE)
    assert kernel.ioctl(device, IOCHVVSSREAD) == kernel.ioctl(device, IOCHVVSSWRITE) == 0
    assert kernel.ioctl(device, FIONBIO) == ENOTCAPABLE
    assert (kernel.poll(device), kernel.fstat(device)) == (0, 0)
    assert (kernel.read(device), kernel.write(device)) == (ENOTCAPABLE, ENOTCAPABLE)
    assert kernel.open("/etc/passwd") == ECAPMODE


def test_simulator_socket_keeps_send_and_receive_and_no_ioctl():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        kernel = CapsicumKernel()
        enter_capability_mode(a.fileno(), LibcCapsicum(kernel.libc()))
        assert kernel.rights[a.fileno()] == rights_words(SIMULATOR_RIGHTS)
        assert (kernel.read(a.fileno()), kernel.write(a.fileno())) == (0, 0)
        assert kernel.ioctl(a.fileno(), IOCHVVSSREAD) == ENOTCAPABLE


def test_descriptor_from_reopen_is_limited_in_capability_mode(device):
    kernel = CapsicumKernel()
    caps = LibcCapsicum(kernel.libc())
    enter_capability_mode(device, caps)
    again = os.dup(device)  # what REOPEN brings: a fresh descriptor, every right
    try:
        assert kernel.ioctl(again, FIONBIO) == 0
        limit_device(again, caps)
        assert kernel.ioctl(again, FIONBIO) == ENOTCAPABLE
        assert kernel.ioctl(again, IOCHVVSSREAD) == 0
    finally:
        os.close(again)


def test_kernel_without_capability_mode_is_refused(device):
    kernel = CapsicumKernel(capability_mode_built_in=False)
    with pytest.raises(SandboxError, match="CAPABILITY_MODE"):
        enter_capability_mode(device, LibcCapsicum(kernel.libc()))


def test_rights_can_only_shrink(device):
    kernel = CapsicumKernel()
    caps = LibcCapsicum(kernel.libc())
    limit_device(device, caps)
    limit_device(device, caps)  # the same rights again: allowed
    caps.rights_limit(device, rights_words(()))  # someone took them all
    with pytest.raises(SandboxError, match="cannot limit the VSS device descriptor"):
        limit_device(device, caps)
    assert kernel.rights[device] == rights_words(())


def test_confine_parent_on_freebsd_limits_then_enters(device, monkeypatch):
    kernel = CapsicumKernel()
    monkeypatch.setattr(sys, "platform", "freebsd14")
    monkeypatch.setattr(sandbox_freebsd, "LibcCapsicum", lambda: LibcCapsicum(kernel.libc()))
    limits: list[tuple[int, tuple[int, int]]] = []
    monkeypatch.setattr(sandbox.resource, "setrlimit", lambda r, v: limits.append((r, v)))
    monkeypatch.setattr(sandbox, "_capsicum", [])
    sandbox.confine_parent(device)
    assert limits == [(sandbox.resource.RLIMIT_CORE, (0, 0))]
    assert kernel.in_mode and kernel.ioctls[device] == (IOCHVVSSREAD, IOCHVVSSWRITE)
    other = os.dup(device)
    try:
        sandbox.limit_device(other)  # the REOPEN path in agent/engine/service.py
        assert kernel.ioctls[other] == (IOCHVVSSREAD, IOCHVVSSWRITE)
    finally:
        os.close(other)
