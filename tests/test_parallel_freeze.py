"""Independent filesystems frozen at once (Linux): on real scratch filesystems, from outside.

The child freezes each dependency level's targets from worker threads that exist only
during the FREEZE (or THAW) and are gone before it answers; a failure of any target
rolls back all; a target whose freeze blocks does not keep the others frozen past the
watchdog; `[freeze] rcu_expedited` holds only while freezing, and a killed child's
successor restores it.
"""

from __future__ import annotations

import errno
import itertools
import os
import signal
import socket
import threading
import time

import psutil
import pytest

from agent.dev.demo import Writer
from agent.kernel import linux_wire as lw
from privileged import rcu
from privileged.freeze_linux import LinuxFreezer
from privileged.freezer import FreezeFailed, Guard, freeze_all
from privileged.rcu import PATH as RCU_PATH
from tests.helpers import Agent, Probe, assert_writable, running_agent, shutdown_ext4, wait_for
from tests.test_attack_root import freeze_by_hand, stalled_freeze, thaw_by_hand

MANY = 8


def _threads(agent: Agent) -> int:
    return agent.child.num_threads()


def test_every_target_is_frozen_when_freeze_is_answered_and_no_thread_is_left(workdir,
                                                                               make_fs):
    fss = [make_fs("ext4", name=f"fs{i}") for i in range(MANY)]
    inner = make_fs("ext4", name="inner", backing_dir=fss[0].mountpoint)  # a second level
    mounts = [fs.mountpoint for fs in (*fss, inner)]
    with running_agent(workdir, mounts, frontend=False, max_frozen=10) as agent:
        # For inner's flush to write into fss[0]: frozen on the same level as fss[0], inner
        # would block until the watchdog fails the FREEZE (seen by breaking the levels).
        with open(os.path.join(inner.mountpoint, "dirty"), "wb") as f:
            f.write(os.urandom(4 << 20))
        seen: list[int] = []
        stop = threading.Event()

        def count() -> None:  # the child's threads, from outside, while it freezes
            while not stop.is_set():
                seen.append(_threads(agent))

        counter = threading.Thread(target=count)
        counter.start()
        try:
            freeze = agent.sim.request("freeze", timeout=60)
        finally:
            stop.set()
            counter.join()
        assert freeze.status == 0, agent.log()
        assert _threads(agent) == 1  # the workers were gone before the answer
        probes = [Probe(m) for m in mounts]
        try:
            time.sleep(0.5)
            assert not [p for p in probes if p.proc.poll() is not None], "not all frozen"
            thaw = agent.sim.request("thaw")
            assert thaw.status == 0
            assert all(p.done_within(5) for p in probes)
        finally:
            for p in probes:
                p.kill()
        assert _threads(agent) == 1
        assert max(seen) > 1, "no worker thread was ever seen: nothing ran at once"


def test_a_failure_of_one_target_thaws_all_the_others(workdir, make_fs):
    fss = [make_fs("ext4", name=f"fs{i}") for i in range(MANY)]
    broken = fss[MANY // 2]
    with running_agent(workdir, [fs.mountpoint for fs in fss], frontend=False) as agent:
        shutdown_ext4(broken.mountpoint)  # its FIFREEZE fails with EIO
        freeze = agent.sim.request("freeze", timeout=60)
        assert freeze.status == lw.HV_E_FAIL
        assert _threads(agent) == 1
        for fs in fss:
            if fs is not broken:
                assert_writable(fs.mountpoint)
        assert f"FREEZE failed on {broken.mountpoint}" in agent.log()


def test_a_blocked_target_does_not_keep_the_others_frozen_past_the_watchdog(workdir,
                                                                            make_fs):
    """B's image lives on C (not a target); with C frozen, B's FIFREEZE blocks for ten
    watchdog windows, while the others, on the same level, are frozen at once by other
    threads.  Each of their writers' longest stall stays within max_frozen_seconds + 0.5 s;
    rcu_expedited (opted in) is back to what it was at the deadline, B still blocking."""
    max_frozen = 1.0
    c = make_fs("ext4", name="holder", size_mb=200)
    b = make_fs("ext4", name="stalled", backing_dir=c.mountpoint)
    others = [make_fs("ext4", name=f"fs{i}") for i in range(MANY)]
    writers = [Writer(os.path.join(fs.mountpoint, "writer.dat")).start() for fs in others]
    rcu_before = _rcu()
    _set_rcu("0")
    try:
        with running_agent(workdir, [b.mountpoint, *[fs.mountpoint for fs in others]],
                           frontend=False, presync=False, max_frozen=max_frozen,
                           rcu_expedited=True, sim_timeouts={"util_timeout": 30.0}) as agent:
            t, answer = stalled_freeze(agent, b.mountpoint, c.mountpoint)
            rcu_during: list[str] = []
            try:
                t.start()
                assert wait_for(lambda: _rcu() == "1" or not t.is_alive(), 5.0)
                rcu_during.append(_rcu())
                time.sleep(2 * max_frozen)
                rcu_during.append(_rcu())  # past the deadline, B still blocked
                assert t.is_alive(), "B's freeze did not block: the test stalled nothing"
                assert _threads(agent) > 1  # a worker is still in B's FIFREEZE
                time.sleep(8 * max_frozen)
            finally:
                thaw_by_hand(c.mountpoint)
            t.join(60)
            assert answer == [lw.HV_E_FAIL]
            assert _threads(agent) == 1
            agent.sim.request("thaw")
            for fs in (b, *others):
                assert_writable(fs.mountpoint)
            assert "watchdog" in agent.log()
    finally:
        _set_rcu(rcu_before)
    for w in writers:
        w.stop()
    assert rcu_during == ["1", "0"]  # expedited while freezing, restored at the deadline
    for w in writers:
        gaps = [later - earlier for earlier, later in itertools.pairwise(w.done)]
        assert max(gaps) > 0.5 * max_frozen, "a target was never frozen"
        assert max(gaps) <= max_frozen + 0.5, f"a target stayed frozen {max(gaps):.1f} s"


def test_a_killed_child_s_successor_restores_rcu_expedited_and_thaws(workdir, make_fs):
    """The child is SIGKILLed while it holds rcu_expedited at 1 (a freeze blocked, as
    above, long before the watchdog's deadline): the next child restores it from the crash
    record at start-up, and thaws what the dead one froze."""
    c = make_fs("ext4", name="holder", size_mb=200)
    b = make_fs("ext4", name="stalled", backing_dir=c.mountpoint)
    a = make_fs("ext4", name="first")
    rcu_before = _rcu()
    _set_rcu("0")
    try:
        config = {"frontend": False, "presync": False, "max_frozen": 30.0,
                  "rcu_expedited": True, "sim_timeouts": {"util_timeout": 30.0}}
        agent = Agent(workdir, [a.mountpoint, b.mountpoint], **config)  # type: ignore[arg-type]
        try:
            agent.start()
            t, _ = stalled_freeze(agent, b.mountpoint, c.mountpoint)
            try:
                t.start()
                assert wait_for(lambda: _rcu() == "1", 5.0), "never expedited"
                child = agent.child
                child.send_signal(signal.SIGKILL)  # lands once B's FIFREEZE returns
            finally:
                thaw_by_hand(c.mountpoint)
            psutil.wait_procs([child], timeout=30)
            assert _rcu() == "1", "the killed child cannot have restored it"
            agent.wait_exit(30)
            t.join(60)
        finally:
            agent.stop()
        with running_agent(workdir, [a.mountpoint, b.mountpoint], **config) as successor:
            assert _rcu() == "0"
            assert "restored /sys/kernel/rcu_expedited to 0" in successor.log()
            assert_writable(a.mountpoint)
            assert_writable(b.mountpoint)
    finally:
        _set_rcu(rcu_before)


def test_rcu_expedited_already_on_is_left_as_it_is(workdir, make_fs):
    """With the opt-in and the system already expedited, the child changes nothing: it
    freezes and thaws, and leaves 1 there; nothing is recorded to restore."""
    fs = make_fs("ext4")
    rcu_before = _rcu()
    _set_rcu("1")
    try:
        with running_agent(workdir, [fs.mountpoint], frontend=False,
                           rcu_expedited=True) as agent:
            assert agent.sim.request("freeze").status == 0, agent.log()
            assert _rcu() == "1"
            assert agent.sim.request("thaw").status == 0, agent.log()
            assert _rcu() == "1"
            assert agent.sim.request("freeze").status == 0, agent.log()  # the child lives on
            assert agent.sim.request("thaw").status == 0
            assert "restored /sys/kernel/rcu_expedited" not in agent.log()
    finally:
        _set_rcu(rcu_before)


def test_rcu_expedited_put_back_after_a_freeze_is_not_put_back_again_after_a_crash(
        workdir, make_fs):
    """rcu_expedited is put back as soon as the FREEZE is done, and the crash record says
    so: a child killed later, while still frozen, has its successor thaw what it froze but
    leave alone the value the operator has set since."""
    a = make_fs("ext4", name="first")
    rcu_before = _rcu()
    _set_rcu("0")
    try:
        config = {"frontend": False, "presync": False, "rcu_expedited": True}
        agent = Agent(workdir, [a.mountpoint], **config)  # type: ignore[arg-type]
        try:
            agent.start()
            assert agent.sim.request("freeze").status == 0
            assert _rcu() == "0"
            _set_rcu("1")  # the operator's own choice, made while we are frozen
            child = agent.child
            child.send_signal(signal.SIGKILL)
            psutil.wait_procs([child], timeout=30)
            agent.wait_exit(30)
        finally:
            agent.stop()
        with running_agent(workdir, [a.mountpoint], **config) as successor:
            assert_writable(a.mountpoint)  # the crash record's target: thawed
            assert "restored /sys/kernel/rcu_expedited" not in successor.log()
            assert _rcu() == "1"
    finally:
        _set_rcu(rcu_before)


def _rcu() -> str:
    with open(RCU_PATH, encoding="ascii") as f:
        return f.read().strip()


def _set_rcu(value: str) -> None:
    with open(RCU_PATH, "w", encoding="ascii") as f:
        f.write(value)


def test_a_crash_record_value_that_is_not_0_or_1_is_not_written_to_the_kernel():
    before = _rcu()
    try:
        _set_rcu("0")
        said = rcu.recover("7")
        assert "left as it is" in said and _rcu() == "0"
        assert rcu.recover("1").startswith("restored") and _rcu() == "1"  # 0 and 1 are
    finally:
        _set_rcu(before)


def test_rcu_expedited_that_cannot_be_opened_is_one_line_naming_the_key(monkeypatch, workdir):
    monkeypatch.setattr(rcu, "PATH", os.path.join(workdir, "absent"))
    with pytest.raises(OSError) as e:
        rcu.Expedite.open()
    assert str(e.value.strerror).startswith("[freeze] rcu_expedited: cannot open ")


def test_an_error_of_the_freeze_loop_itself_ends_it_only_after_its_workers_and_rolls_back(
        make_fs):
    """The deadline's action (putting rcu_expedited back) fails while B's freeze blocks in
    the kernel: freeze_all waits for B's worker, thaws everything, and raises the loop's own
    error, not B's later "frozen after the deadline", so the child ends on it rather than
    answering as if one target had failed.  Left without its worker, B froze after the
    rollback and stayed frozen."""
    c = make_fs("ext4", name="holder", size_mb=200)
    b = make_fs("ext4", name="stalled", backing_dir=c.mountpoint)
    a = make_fs("ext4", name="other")
    freezer = LinuxFreezer()
    by_path = {m.mountpoint: m for m in freezer.mounts()}
    targets = [by_path[a.mountpoint], by_path[b.mountpoint]]
    with open(os.path.join(b.mountpoint, "dirty"), "wb") as f:
        f.write(os.urandom(1 << 20))
    guard = Guard(socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET), freezer.release,
                  lambda: None)
    tasks = len(os.listdir("/proc/self/task"))
    freeze_by_hand(c.mountpoint)  # B's freeze now blocks: its journal cannot reach C

    let_go = threading.Timer(0.5, thaw_by_hand, (c.mountpoint,))

    def restoring_fails() -> None:  # C is let go a moment after the action gave up
        let_go.start()
        raise OSError(errno.EROFS, "cannot put rcu_expedited back")

    try:
        with pytest.raises(OSError, match="rcu_expedited") as raised:
            freeze_all(freezer, guard, targets, presync=False, clock=time.monotonic,
                       deadline=time.monotonic() + 0.5, levels=[[0, 1]],
                       at_deadline=restoring_fails)
        assert not isinstance(raised.value, FreezeFailed)
        assert_writable(a.mountpoint)
        assert_writable(b.mountpoint)
        assert wait_for(lambda: len(os.listdir("/proc/self/task")) == tasks)
    finally:
        guard.close()
        if let_go.is_alive():
            let_go.join()
        for fs in (b, a, c):
            thaw_by_hand(fs.mountpoint)


def test_each_freeze_expedites_again_after_the_last_one_put_it_back(workdir):
    """Expedite on a file standing in for /sys/kernel/rcu_expedited: every on() reads the
    value afresh, from its start, so a second FREEZE expedites as the first did."""
    path = os.path.join(workdir, "rcu_expedited")
    with open(path, "w", encoding="ascii") as f:
        f.write("0\n")
    expedite = rcu.Expedite(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    noted: list[str] = []
    try:
        for _ in range(2):
            expedite.on(noted.append)
            with open(path, encoding="ascii") as f:
                assert f.read(1) == "1"
            expedite.off(lambda: None)
            with open(path, encoding="ascii") as f:
                assert f.read(1) == "0"
        assert noted == ["0", "0"]
    finally:
        os.close(expedite.fd)
