"""Faults: no single one leaves anything frozen (issue: crash safety).

Real agent, real child, real scratch filesystems; the faults are real too
(SIGKILL, SIGSTOP, a dropped connection, a late reply, a device that is not
there yet), injected from outside through the processes and the simulator.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import threading
import time

from agent.dev import scratch
from agent.engine import machine as E
from agent.engine.child_link import ChildLink
from agent.engine.freeze_gate import FreezeGate
from agent.engine.service import EXIT_ENGINE_LOST_TRACK, Service
from agent.kernel import linux_wire as lw
from agent.kernel.channel import KernelChannel
from agent.kernel.protocol import LINUX
from agent.kernel.transport import attach
from agent.simulator.server import Simulator
from privileged import wire
from tests.helpers import (
    Agent,
    assert_blocked,
    assert_writable,
    running_agent,
    wait_for,
    write_config,
)

FAIL_REPLY = struct.pack("<I", lw.HV_E_FAIL) + bytes(8)
# What the agent logs when the kernel refuses its reply (service.py, _reply).
LATE_REPLY = "kernel channel: write failed: Invalid argument (late reply?)"


def test_sigkilled_child_is_recovered_by_the_next_start(workdir, ext4_xfs):
    """Linux freezes outlive the child; its crash record lets the next child thaw them."""
    mounts = [fs.mountpoint for fs in ext4_xfs]
    agent = Agent(workdir, mounts).start()
    try:
        assert agent.sim.request("freeze").status == 0
        probes = [assert_blocked(m, 0.3) for m in mounts]
        with open(os.path.join(workdir, "state", "frozen"), encoding="utf-8") as f:
            assert sorted(line.split(" ", 1)[1].strip() for line in f) == sorted(mounts)
        os.kill(agent.child.pid, signal.SIGKILL)
        # the parent notices at once, says why, and exits non-zero for a restart
        assert agent.wait_exit(5) == 3
        assert "the root child is gone" in agent.log()
        assert not probes[0].done_within(0.3), "SIGKILL should have left it frozen"
        restarted = time.monotonic()
        agent.launch(wait=False)
        for p in probes:
            assert p.done_within(max(0.1, 2.0 - (time.monotonic() - restarted))), \
                "not writable two seconds after the restart"
        agent.wait_registered(connections=2)
        assert wait_for(lambda: "recovery: thawed" in agent.log())
        assert os.path.getsize(os.path.join(workdir, "state", "frozen")) == 0  # emptied
    finally:
        agent.stop()


def test_child_death_fails_the_pending_request(workdir, ext4_xfs):
    mounts = [fs.mountpoint for fs in ext4_xfs]
    agent = Agent(workdir, mounts).start()
    try:
        assert agent.sim.request("freeze").status == 0
        child = agent.child
        child.suspend()  # the THAW will reach it but never be answered
        thaw = agent.sim.send("thaw")
        time.sleep(0.3)
        assert not thaw.done
        child.kill()
        agent.sim.wait(thaw, 5)
        assert (thaw.status, thaw.daemon_reply) == (lw.HV_E_FAIL, FAIL_REPLY)
        assert agent.wait_exit(5) == 3
    finally:
        agent.stop()
        for m in mounts:  # the killed child could not thaw; the next start would
            scratch.thaw(m)


def test_connection_dropped_while_frozen_thaws_reopens_and_says_so(workdir, ext4_xfs):
    mounts = [fs.mountpoint for fs in ext4_xfs]
    with running_agent(workdir, mounts) as agent:
        assert agent.sim.request("freeze").status == 0
        probe = assert_blocked(mounts[0], 0.3)
        agent.sim.drop_connection()
        assert probe.done_within(5), "still frozen after the kernel channel was lost"
        agent.wait_registered(connections=2)
        # the host's THAW for that backup: the snapshot may postdate our thaw
        thaw = agent.sim.request("thaw")
        assert thaw.daemon_reply == FAIL_REPLY
        assert agent.sim.request("freeze").status == 0  # a new backup works
        assert agent.sim.request("thaw").status == 0


def test_late_thaw_reply_is_recovered(workdir, ext4_xfs):
    """The upstream reproducer: SIGSTOP the daemon until the kernel gives up on it.

    The THAW stays unread on the device meanwhile (vss_timeout_func answers the host and
    leaves the message); resumed, the agent reads it, thaws, and its reply is refused
    (vss_on_msg: "Transaction not active", EINVAL): the agent's own write-failure path,
    on a device that stays open until the agent closes it and reopens."""
    mounts = [fs.mountpoint for fs in ext4_xfs]
    with running_agent(workdir, mounts, sim_timeouts={"util_timeout": 1.0}) as agent:
        assert agent.sim.request("freeze").status == 0
        agent.parent.suspend()
        thaw = agent.sim.request("thaw", timeout=5)
        assert (thaw.status, thaw.answered_by) == (lw.HV_E_FAIL, "timeout")
        agent.parent.resume()  # now it thaws and replies late: EINVAL, reopen
        for m in mounts:
            assert_writable(m)
        agent.wait_registered(connections=2)
        assert LATE_REPLY in agent.log()
        assert "the device was closed" not in agent.log()
        assert agent.sim.request("check").status == 0


def test_late_freeze_reply_thaws_before_reopening(workdir, ext4_xfs):
    mounts = [fs.mountpoint for fs in ext4_xfs]
    with running_agent(workdir, mounts, sim_timeouts={"freeze_timeout": 1.0}) as agent:
        agent.parent.suspend()
        freeze = agent.sim.request("freeze", timeout=5)
        assert freeze.answered_by == "timeout"
        agent.parent.resume()  # it freezes, its reply is refused (EINVAL), it thaws
        agent.wait_registered(connections=2)
        for m in mounts:
            assert_writable(m)
        text = agent.log()
        assert LATE_REPLY in text and "the device was closed" not in text
        assert wait_for(lambda: "thawing before reopening" in agent.log())
        assert agent.log().index(LATE_REPLY) < agent.log().index("thawing before reopening")


def test_device_appearing_after_start_up(workdir, ext4_xfs):
    agent = Agent(workdir, [ext4_xfs[0].mountpoint])
    try:
        agent.launch(wait=False)
        assert wait_for(lambda: "waiting for" in agent.log(), 10)
        time.sleep(0.5)
        agent.sim.start()
        agent.wait_registered()
        assert agent.log().count("waiting for") == 1  # one line, not one per retry
        assert agent.sim.request("check").status == 0
    finally:
        agent.stop()


def test_bursts_of_requests_are_each_answered(workdir, ext4_xfs):
    mounts = [fs.mountpoint for fs in ext4_xfs]
    with running_agent(workdir, mounts) as agent:
        sent = [agent.sim.send(op) for _ in range(20) for op in ("check", "freeze", "thaw")]
        for req in sent:
            agent.sim.wait(req, 30)
        assert [r.status for r in sent] == [0] * len(sent)
        assert [r.daemon_reply for r in sent] == [bytes(12)] * len(sent)
        for m in mounts:
            assert_writable(m)


def test_freeze_twice_then_thaw(workdir, ext4_xfs):
    mounts = [fs.mountpoint for fs in ext4_xfs]
    with running_agent(workdir, mounts) as agent:
        assert agent.sim.request("freeze").status == 0
        assert agent.sim.request("freeze").status == 0  # still frozen: success
        probe = assert_blocked(mounts[1], 0.3)
        assert agent.sim.request("thaw").status == 0
        assert probe.done_within(5)
        assert agent.child.is_running()  # the child never saw the second FREEZE


def test_an_engine_that_loses_track_ends_the_pair_with_nothing_frozen(workdir, make_fs,
                                                                       monkeypatch, caplog):
    """EngineError (an input that does not fit the engine's state) is a bug the service
    loop's own checks keep out, so the engine is broken here on purpose: it fails on the
    child's answer to FREEZE, with the filesystem frozen.  The host is answered failure,
    the child thaws and exits 0, and the parent exits 5 for a restart."""
    fs = make_fs("ext4")
    config = write_config(os.path.join(workdir, "c.toml"), [fs.mountpoint], workdir)
    engine = E.Engine(LINUX)
    real = engine.on_child_result

    def broken(res: wire.Result, now: float) -> list[E.Action]:
        if res.op is wire.Op.FREEZE:  # the child has frozen; the engine does not know it
            raise E.EngineError("a test broke it")
        return real(res, now)

    monkeypatch.setattr(engine, "on_child_result", broken)
    with Simulator(os.path.join(workdir, "vss.sock")) as sim:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        s.connect(sim.path)
        kernel = KernelChannel(attach(s.detach(), "linux"), LINUX)
        kernel.register()
        child = ChildLink.spawn(config, None)
        child.wait_hello()
        service = Service(engine, child, FreezeGate(logging.NullHandler()), protocol=LINUX,
                          kernel=kernel)
        ran = threading.Thread(target=service.run)
        ran.start()
        try:
            sim.wait_registered(5)
            answer = sim.request("freeze", timeout=20)
            ran.join(20)
            assert not ran.is_alive()
            assert (answer.status, answer.daemon_reply) == (lw.HV_E_FAIL, FAIL_REPLY)
            assert service.exit_code == EXIT_ENGINE_LOST_TRACK
            assert child.exit_status(5) == 0  # it thawed, then exited
            assert not service.left_frozen
            assert_writable(fs.mountpoint)
            assert wait_for(lambda: "the engine lost track of the conversation (a test broke "
                            "it): the child thawed; exiting" in caplog.text)
        finally:
            child.close()
            if child.exit_status(5) is None:
                child.proc.kill()
            kernel.close()
            scratch.thaw(fs.mountpoint)
