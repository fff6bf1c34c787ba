"""The thaw guard, from outside: real processes, real scratch filesystems.

The root child forks its guard once, before it confines itself; the guard thaws what
it was told is frozen when the deadline passes (tests/test_attack_root.py) or the moment
the child is gone, and a child whose guard is gone ends, so that its successor forks a
new one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import textwrap
import time

import psutil

from agent.kernel import linux_wire as lw
from privileged import hardening
from privileged.child_config import parse_child_sections
from privileged.freeze_memory import MOUNTS, MemoryFreezer
from privileged.freezer import Guard, freeze_all, thaw
from privileged.selection import select_targets
from tests.helpers import PY, Agent, assert_blocked, assert_writable, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A stand-in for the child: arms a guard with the mountpoint's descriptor and a deadline a
# minute away, freezes it, tells the guard, and is killed before it can thaw or disarm.
KILLED_MID_FREEZE = textwrap.dedent("""\
    import fcntl, os, signal, socket, sys, time
    sys.path.insert(0, sys.argv[2])
    from privileged.freeze_linux import FIFREEZE, LinuxFreezer
    from privileged.freezer import Guard
    guard = Guard(socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET),
                  LinuxFreezer().release, lambda: None)
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
    guard.arm([fd], time.monotonic() + 60)
    fcntl.ioctl(fd, FIFREEZE, 0)
    guard.tell(0)
    print(guard.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_the_guard_thaws_at_once_when_the_child_dies_mid_freeze(make_fs):
    fs = make_fs("ext4")
    proc = subprocess.run([PY, "-I", "-c", KILLED_MID_FREEZE, fs.mountpoint, ROOT],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    guard = int(proc.stdout)
    # well before the minute's deadline: the guard saw its socket's EOF and thawed
    assert_writable(fs.mountpoint, 5.0)
    assert wait_for(lambda: not psutil.pid_exists(guard), 5.0)


def test_a_child_whose_guard_is_killed_thaws_and_ends_and_the_next_one_has_a_guard(workdir,
                                                                                  make_fs):
    fs = make_fs("ext4")
    agent = Agent(workdir, [fs.mountpoint], frontend=False).start()
    try:
        assert agent.sim.request("freeze").status == lw.HV_S_OK
        probe = assert_blocked(fs.mountpoint)
        child = agent.child
        (guard,) = child.children()
        guard.kill()
        # without a guard no FREEZE could be bounded: the child thaws what it holds and
        # ends, and the parent exits for the service manager to start it again
        assert probe.done_within(5), "still frozen after the guard was killed"
        assert agent.wait_exit(10) == 3
        assert "the thaw guard is gone" in agent.log()
        agent.launch(wait=False)
        agent.wait_registered(connections=2)
        (new_guard,) = agent.child.children()
        assert new_guard.pid != guard.pid
        assert agent.sim.request("freeze").status == lw.HV_S_OK
        probe = assert_blocked(fs.mountpoint)
        assert agent.sim.request("thaw").status == lw.HV_S_OK
        assert probe.done_within(5)
    finally:
        agent.stop()


def test_the_demo_s_in_memory_freezer_hands_the_guard_real_descriptors():
    """The unprivileged demo freezes nothing, yet FREEZE goes through the same guard, which
    takes descriptors only (SCM_RIGHTS refuses -1 with EBADF)."""
    freezer = MemoryFreezer()
    targets = select_targets(freezer.mounts(), parse_child_sections({}), freezer.platform).targets
    assert sorted(targets, key=MOUNTS.index) == list(MOUNTS)  # the demo freezes both
    guard = Guard(socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET), freezer.release,
                  lambda: None)
    fds_before = set(os.listdir("/proc/self/fd"))
    try:
        held = freeze_all(freezer, guard, targets, presync=True,
                          deadline=time.monotonic() + 60, clock=time.monotonic)
        assert freezer.frozen == {m.fs_key for m in MOUNTS}
        assert thaw(freezer, held) == []
        assert freezer.frozen == set()
        assert set(os.listdir("/proc/self/fd")) == fds_before  # every descriptor given back
    finally:
        guard.close()


def test_the_in_memory_freezer_gives_back_every_descriptor_it_opened():
    """What a FREEZE that fails before its guard is armed closes (freezer.close)."""
    freezer = MemoryFreezer()
    before = sorted(os.listdir("/proc/self/fd"))
    for fd in freezer.open(list(MOUNTS)):
        freezer.close(fd)
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_a_guard_that_died_during_a_freeze_makes_the_freeze_fail():
    """disarm() after the guard is gone answers "fired or gone", so the FREEZE fails and is
    rolled back: what the guard was told may or may not be frozen now."""
    guard = Guard(socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET),
                  lambda fd: None, lambda: None)
    try:
        os.kill(guard.pid, signal.SIGKILL)
        os.waitpid(guard.pid, 0)
        assert guard.disarm() is True
    finally:
        guard.sock.close()


def test_on_freebsd_the_guard_keeps_0_to_2_taken_by_dev_null(monkeypatch):
    """It closes every descriptor but its end of the link, then takes 0-2 as the child
    does (privileged/hardening.py quiet_stdio): on FreeBSD /dev/null, so that a
    /dev/ufssuspend descriptor it is passed never lands where a stray write to stdout would
    be a raw write to the suspended disk.  (On Linux 0-2 stay closed: test_confinement.py.)"""
    monkeypatch.setattr(hardening, "LINUX", False)
    guard = Guard(socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET),
                  lambda fd: None, lambda: None)

    def held() -> dict[int, str]:
        return {int(fd): os.readlink(f"/proc/{guard.pid}/fd/{fd}")
                for fd in os.listdir(f"/proc/{guard.pid}/fd")}

    try:
        assert wait_for(lambda: len(held()) == 4), held()  # pytest's own are many more
        fds = held()
        assert [fds.pop(fd) for fd in (0, 1, 2)] == [os.devnull] * 3
        assert [target.startswith("socket:") for target in fds.values()] == [True]
    finally:
        guard.close()
