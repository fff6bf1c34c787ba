"""The whole agent speaking FreeBSD's protocol to the model of hv_snapshot.c, freezing for real.

The FreeBSD protocol flavour (64-byte hv_vss_opt_msg, IOCHVVSSREAD and
IOCHVVSSWRITE as records over the simulator's socket) drives the Linux freezer on scratch
filesystems the tests made ([freeze] only), so every FREEZE here is real.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from agent.kernel import freebsd_wire as fw
from agent.simulator import host
from tests.helpers import REPO, Agent, assert_blocked, assert_writable, wait_for

pytestmark = pytest.mark.freebsd_model


def reply(opt: int, msgid: int, status: int = 0) -> bytes:
    return fw.MSG.pack(opt, status, msgid, bytes(48))


@contextlib.contextmanager
def freebsd_agent(workdir: str, mounts: list[str], chain_timeout: float = 15.0,
                  **config: object) -> Iterator[Agent]:
    agent = Agent(workdir, mounts, protocol="freebsd",
                  sim_timeouts={"chain_timeout": chain_timeout}, kernel_timeout=chain_timeout,
                  **config)
    try:
        agent.start()
        serving(agent)
        yield agent
    finally:
        agent.stop()


def serving(agent: Agent, times: int = 1) -> None:
    """FreeBSD's open() registers at once: wait for the agent's own word that it serves."""
    assert wait_for(lambda: agent.log().count("registered with the kernel") >= times, 30), \
        agent.log()


def msgid_of(raw: bytes | None) -> int:
    assert raw is not None and len(raw) == 64
    return int(fw.MSG.unpack(raw)[2])


def test_check_freeze_thaw_golden_replies(workdir, ext4_xfs):
    mounts = [fs.mountpoint for fs in ext4_xfs]
    with freebsd_agent(workdir, mounts) as agent:
        before = time.time_ns()
        check = agent.sim.request("check")
        assert (check.status, check.flags) == (host.HV_S_OK, host.VSS_HBU_NO_AUTO_RECOVERY)
        assert check.daemon_reply == reply(fw.HV_VSS_CHECK, msgid_of(check.daemon_reply))
        assert before <= msgid_of(check.daemon_reply) <= time.time_ns()  # nanotime()

        freeze = agent.sim.request("freeze")
        assert freeze.daemon_reply == reply(fw.HV_VSS_FREEZE, msgid_of(freeze.daemon_reply))
        assert freeze.status == host.HV_S_OK
        probes = [assert_blocked(m) for m in mounts]

        thaw = agent.sim.request("thaw")
        assert thaw.daemon_reply == reply(fw.HV_VSS_THAW, msgid_of(thaw.daemon_reply))
        assert thaw.status == host.HV_S_OK
        for p in probes:
            assert p.done_within(5), "the blocked write did not complete after THAW"


def test_a_read_that_finds_nothing_is_ignored(workdir, ext4_xfs):
    with freebsd_agent(workdir, [ext4_xfs[0].mountpoint]) as agent:
        agent.sim.nothing_pending()  # woken, and the READ finds the queue empty
        assert wait_for(lambda: "woken with nothing pending" in agent.log())
        driver = agent.sim.driver
        assert driver.log == ["hv_vss_notified: notify queue is empty!"]
        assert driver.dropped_acks == []  # no WRITE
        assert agent.sim.request("check").status == host.HV_S_OK


def test_unknown_opt_is_answered_failure_echoing_opt_and_msgid(workdir, ext4_xfs):
    with freebsd_agent(workdir, [ext4_xfs[0].mountpoint]) as agent:
        agent.sim.inject(fw.MSG.pack(7, fw.VSS_SUCCESS, 0x1122334455667788, bytes(48)))
        driver = agent.sim.driver
        assert wait_for(lambda: driver.dropped_acks)  # no request has that msgid
        assert driver.dropped_acks == [reply(7, 0x1122334455667788, status=fw.VSS_FAIL)]
        assert agent.sim.request("check").status == host.HV_S_OK


def test_a_freeze_that_timed_out_while_the_agent_was_stopped_is_never_done(workdir, ext4_xfs):
    """hv_vss_timeout takes the unread FREEZE out of the notify queue: the agent, resumed,
    is woken by the poll that came before, and its READ finds nothing (hv_vss_notified,
    status VSS_FAIL).  Nothing is frozen and nothing is written back."""
    mounts = [fs.mountpoint for fs in ext4_xfs]
    with freebsd_agent(workdir, mounts, chain_timeout=1.0) as agent:
        parent = agent.parent
        os.kill(parent.pid, signal.SIGSTOP)  # the agent is slow: it reads after the timeout
        try:
            freeze = agent.sim.send("freeze")
            agent.sim.wait(freeze, 10)
        finally:
            os.kill(parent.pid, signal.SIGCONT)
        assert (freeze.status, freeze.answered_by) == (host.HV_E_FAIL, "timeout")
        assert wait_for(lambda: "woken with nothing pending" in agent.log(), 10), agent.log()
        driver = agent.sim.driver
        assert "hv_vss_notified: notify queue is empty!" in driver.log
        assert driver.dropped_acks == []
        assert "FROZEN" not in agent.log() and "kernel request FREEZE" not in agent.log()
        for m in mounts:
            assert_writable(m, 2)
        assert agent.sim.request("check").status == host.HV_S_OK


def test_a_request_outlives_an_agent_killed_before_reading_it(workdir, ext4_xfs):
    """hv_vss_dev_close only ends the registration: the CHECK stays in the notify queue
    and the next agent, started within the budget, reads and answers it."""
    mounts = [fs.mountpoint for fs in ext4_xfs]
    with freebsd_agent(workdir, mounts, chain_timeout=30.0) as agent:
        agent.parent.suspend()
        check = agent.sim.send("check")
        agent.parent.kill()
        assert agent.wait_exit(10) == -signal.SIGKILL
        assert wait_for(lambda: not agent.sim.registered(), 10)
        assert not check.done
        agent.launch()
        serving(agent, times=2)
        agent.sim.wait(check, 15)
        assert (check.status, check.answered_by) == (host.HV_S_OK, "daemon")
        assert check.daemon_reply == reply(fw.HV_VSS_CHECK, msgid_of(check.daemon_reply))


def test_a_freeze_finished_after_the_kernel_gave_up_is_undone_at_once(workdir, ext4_xfs):
    """The child is held mid-FREEZE past the budget: its late freeze is thawed at once,
    not left until the host's THAW or the watchdog (nobody will snapshot it)."""
    mounts = [fs.mountpoint for fs in ext4_xfs]
    with freebsd_agent(workdir, mounts, chain_timeout=1.0) as agent:
        child = agent.child
        child.suspend()
        freeze = agent.sim.send("freeze")
        agent.sim.wait(freeze, 10)
        assert (freeze.status, freeze.answered_by) == (host.HV_E_FAIL, "timeout")
        child.resume()  # now it freezes, too late
        assert wait_for(lambda: "thawing now" in agent.log(), 10), agent.log()
        for m in mounts:
            assert_writable(m, 5)
        driver = agent.sim.driver
        assert driver.dropped_acks == [reply(fw.HV_VSS_FREEZE,
                                             msgid_of(driver.dropped_acks[0]), status=1)]
        assert agent.sim.request("thaw").status == host.HV_S_OK  # nothing frozen: success


def test_exclusive_open_a_second_agent_is_refused_in_one_line(workdir, ext4_xfs):
    with freebsd_agent(workdir, [ext4_xfs[0].mountpoint]) as agent:
        second = subprocess.run(
            [sys.executable, "-m", "agent", "-n", "--config", agent.config, "--device",
             agent.socket], check=False, cwd=REPO, capture_output=True, text=True,
            timeout=60)
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr  # refused before its child even started
        assert lines[0] == (f"hv-vss-agent: {agent.socket} is busy: another VSS daemon has "
                            "it open (stop hv_vss_daemon first)")
        assert "Traceback" not in second.stderr
        assert agent.sim.refused == 1
        assert agent.sim.request("check").status == host.HV_S_OK  # the first one still serves


def test_requests_wait_for_the_first_open_and_fail_at_once_after_close(workdir, ext4_xfs):
    agent = Agent(workdir, [ext4_xfs[0].mountpoint], protocol="freebsd")
    try:
        agent.sim.start()
        early = agent.sim.send("check")  # no daemon has ever opened the device
        time.sleep(0.3)
        assert not early.done
        agent.launch()
        serving(agent)
        agent.sim.wait(early, 15)
        assert (early.status, early.answered_by) == (host.HV_S_OK, "daemon")

        agent.proc.send_signal(signal.SIGTERM)
        assert agent.wait_exit(15) == 0
        assert wait_for(lambda: not agent.sim.registered())
        gone = agent.sim.request("freeze", timeout=5)
        assert (gone.status, gone.answered_by) == (host.HV_E_FAIL, "kernel")
        assert_writable(ext4_xfs[0].mountpoint)

        agent.launch()  # devd or rc starts it again: the device is free once more
        serving(agent, times=2)
        assert agent.sim.request("freeze").status == host.HV_S_OK
        assert agent.sim.request("thaw").status == host.HV_S_OK
    finally:
        agent.stop()


def test_the_demo_runs_with_the_freebsd_protocol(workdir):
    """`hv-vss-agent --simulate --protocol freebsd`: its own scratch filesystems, real freezes."""
    demo = subprocess.run(
        [sys.executable, "-m", "agent", "--simulate", "--protocol", "freebsd", "--cycles", "1",
         "--hold", "0.3"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "(freebsd driver model)" in demo.stdout
    assert re.search(r"host FREEZE -> HV_S_OK .* agent wrote: 02000000 00000000 \w{8} \w{8} "
                     r"\+ 48 zero bytes", demo.stdout), demo.stdout
    assert "OK: 1 cycle(s); every reply as expected; every writer stopped while frozen" \
        in demo.stdout
