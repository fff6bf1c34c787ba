"""The whole agent, for real: simulator -> unprivileged parent -> root child -> FIFREEZE.

Every test freezes only scratch filesystems it made ([freeze] only), and the
fixtures thaw and remove them whatever happens.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import signal
import struct
import subprocess
import time

from agent.dev.demo import Writer
from agent.kernel import linux_wire as lw
from privileged.freeze_linux import FIFREEZE, FITHAW
from tests.helpers import (
    Agent,
    Probe,
    assert_blocked,
    assert_writable,
    running_agent,
    shutdown_ext4,
    wait_for,
)

OK_REPLY = bytes(12)  # HV_S_OK over the request's remaining (zero) bytes
FAIL_REPLY = struct.pack("<I", lw.HV_E_FAIL) + bytes(8)


def test_check_freeze_thaw_on_ext4_and_xfs(workdir, ext4_xfs):
    mounts = [fs.mountpoint for fs in ext4_xfs]
    with running_agent(workdir, mounts) as agent:
        check = agent.sim.request("check")
        assert (check.status, check.answered_by, check.daemon_reply) == (0, "daemon", OK_REPLY)

        freeze = agent.sim.request("freeze")
        assert (freeze.status, freeze.daemon_reply) == (0, OK_REPLY)
        probes = [assert_blocked(m) for m in mounts]

        thaw = agent.sim.request("thaw")
        assert (thaw.status, thaw.daemon_reply) == (0, OK_REPLY)
        for p in probes:
            assert p.done_within(5), "the blocked write did not complete after THAW"
        for m in mounts:
            assert_writable(m)


def test_privileges_parent_unprivileged_child_root_single_threaded(workdir, ext4_xfs):
    with running_agent(workdir, [ext4_xfs[0].mountpoint]) as agent:
        parent, child = agent.parent, agent.child
        assert tuple(parent.uids()) == (999, 999, 999) or all(u != 0 for u in parent.uids())
        assert all(g != 0 for g in parent.gids())
        assert tuple(child.uids()) == (0, 0, 0)
        assert child.num_threads() == 1
        with open(f"/proc/{parent.pid}/status", encoding="ascii") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        assert status["Groups"].strip() == ""
        assert status["NoNewPrivs"].strip() == "1"
        assert child.cmdline()[1:4] == ["-I", "-B", "-S"]
        # and the child is still single-threaded while frozen
        agent.sim.request("freeze")
        assert child.num_threads() == 1
        agent.sim.request("thaw")


def test_sigkill_parent_while_frozen_thaws_within_one_second(workdir, ext4_xfs):
    mounts = [fs.mountpoint for fs in ext4_xfs]
    with running_agent(workdir, mounts) as agent:
        assert agent.sim.request("freeze").status == 0
        probes = [assert_blocked(m, 0.3) for m in mounts]
        child = agent.child
        killed = time.monotonic()
        os.kill(agent.parent.pid, signal.SIGKILL)
        for p in probes:
            assert p.done_within(max(0.05, 1.0 - (time.monotonic() - killed))), \
                "still frozen one second after the parent was killed"
        assert wait_for(lambda: not child.is_running() or child.status() == "zombie", 5)


def test_watchdog_thaws_when_the_host_never_sends_thaw(workdir, ext4_xfs):
    """Measured from outside: a writer on each filesystem stalls at most
    max_frozen_seconds + 0.5 s."""
    mounts = [fs.mountpoint for fs in ext4_xfs]
    writers = [Writer(os.path.join(m, "writer.dat")).start() for m in mounts]
    try:
        with running_agent(workdir, mounts, max_frozen=1.0) as agent:
            assert agent.sim.request("freeze").status == 0
            time.sleep(2.0)  # the host never sends THAW
            # The host's late THAW is told the truth: the snapshot may not be consistent.
            thaw = agent.sim.request("thaw")
            assert (thaw.status, thaw.daemon_reply) == (lw.HV_E_FAIL, FAIL_REPLY)
            assert wait_for(lambda: "watchdog" in agent.log())
            # and the pair is back in step: a new cycle works
            assert agent.sim.request("freeze").status == 0
            assert agent.sim.request("thaw").status == 0
    finally:
        for w in writers:
            w.stop()
    for w in writers:
        longest = max(b - a for a, b in itertools.pairwise(w.done))
        assert 0.5 < longest <= 1.0 + 0.5, f"{w.path}: longest stall {longest:.2f} s"


def test_freeze_failing_on_one_filesystem_leaves_none_frozen(workdir, make_fs):
    bad = make_fs("ext4", "bad")  # mounted first: frozen last (newest first)
    good = [make_fs("ext4", "good"), make_fs("xfs", "goodxfs")]
    shutdown_ext4(bad.mountpoint)
    with running_agent(workdir, [bad.mountpoint] + [g.mountpoint for g in good]) as agent:
        freeze = agent.sim.request("freeze")
        assert (freeze.status, freeze.daemon_reply) == (lw.HV_E_FAIL, FAIL_REPLY)
        for g in good:
            assert_writable(g.mountpoint, 2)
        assert wait_for(lambda: f"FREEZE failed on {bad.mountpoint}" in agent.log())
        # the host's THAW after a failed FREEZE: nothing is frozen, success
        assert agent.sim.request("thaw").status == 0


def test_fake_thaw_on_hibernation_and_thaw_without_freeze_succeed(workdir, ext4_xfs):
    """Hibernation stops processes first, then hv_vss_pre_suspend queues a fake THAW and
    forces the driver READY: the agent, resumed, thaws, and its reply is refused
    (EINVAL) on a device that stays open; it closes, reopens and registers again."""
    mounts = [fs.mountpoint for fs in ext4_xfs]
    with running_agent(workdir, mounts) as agent:
        assert agent.sim.request("thaw").status == 0  # THAW without FREEZE
        assert agent.sim.request("freeze").status == 0
        probe = assert_blocked(mounts[0], 0.3)
        agent.parent.suspend()  # freeze_processes(), before the drivers' suspend
        agent.sim.hibernate()  # pre_suspend (the fake THAW) ... pre_resume
        agent.parent.resume()
        assert probe.done_within(5), "the fake THAW did not thaw"
        agent.wait_registered(connections=2)  # reopened and registered again
        text = agent.log()
        assert "kernel channel: write failed: Invalid argument (late reply?)" in text
        assert "the device was closed" not in text
        assert agent.sim.request("freeze").status == 0
        assert agent.sim.request("thaw").status == 0


def test_logs_are_held_while_frozen_even_when_the_log_is_on_a_frozen_disk(workdir, ext4_xfs):
    """stderr (with -d) goes to a file on a filesystem the agent freezes: one write while
    frozen would block the parent and the THAW would never be answered."""
    mounts = [fs.mountpoint for fs in ext4_xfs]
    log_path = os.path.join(mounts[0], "agent.log")
    with running_agent(workdir, mounts, log_path=log_path) as agent:
        for _ in range(3):
            assert agent.sim.request("check", timeout=10).status == 0
            assert agent.sim.request("freeze", timeout=10).status == 0
            assert agent.sim.request("thaw", timeout=10).status == 0
        # what was logged while frozen arrived after the thaw, each process's lines in order
        assert wait_for(lambda: agent.log().count("THAWED 2 filesystem(s)") == 3)
        text = agent.log()
        assert text.index("FROZEN:") < text.index("THAWED 2")
        assert text.index("kernel request FREEZE") < text.index("kernel request THAW")


def test_probe_itself_detects_a_frozen_filesystem(make_fs):
    """The probe this suite relies on really blocks on a frozen filesystem."""
    from agent.dev import scratch

    fs = make_fs("ext4")
    fd = os.open(fs.mountpoint, os.O_RDONLY)
    import fcntl

    fcntl.ioctl(fd, 0xC0045877, 0)
    try:
        probe = Probe(fs.mountpoint)
        assert not probe.done_within(0.3)
    finally:
        scratch.thaw(fs.mountpoint)
        os.close(fd)
    assert probe.done_within(5)


def test_daemon_mode_detaches_and_logs_to_syslog(workdir, ext4_xfs):
    """Without -n: the command returns at once, the daemon serves, and logs go to syslog."""
    import socket
    import subprocess

    import psutil

    from agent.simulator.server import Simulator
    from tests.helpers import PY, REPO, write_config

    syslog_path = os.path.join(workdir, "log.sock")
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind(syslog_path)
    syslog.settimeout(10)
    mounts = [fs.mountpoint for fs in ext4_xfs]
    cfg = write_config(os.path.join(workdir, "d.toml"), mounts, workdir,
                       extra=f'[log]\nsyslog_socket = "{syslog_path}"\n')
    sock = os.path.join(workdir, "vss.sock")
    with Simulator(sock) as sim:
        proc = subprocess.run([PY, "-m", "agent", "--config", cfg, "--device", sock],
                              cwd=REPO, timeout=30, capture_output=True, text=True, check=False)
        assert (proc.returncode, proc.stderr) == (0, "")
        def daemons() -> list[psutil.Process]:
            return [p for p in psutil.process_iter(["cmdline"])
                    if (p.info["cmdline"] or [])[1:3] == ["-m", "agent"]
                    and cfg in p.info["cmdline"]]

        # daemonize's intermediate process (between its two forks) may still be exiting
        assert wait_for(lambda: len(daemons()) == 1, 10)
        daemon = daemons()[0]
        try:
            assert daemon.ppid() != os.getpid()  # detached: not our child any more
            assert wait_for(sim.registered, 20)
            assert all(u != 0 for u in daemon.uids())
            assert sim.request("freeze").status == 0
            assert sim.request("thaw").status == 0
            lines = []
            while not any("THAWED 2" in line for line in lines):
                lines.append(syslog.recv(4096).decode())
            assert any(line.startswith("<30>hv-vss-agent[") and "root child" in line
                       for line in lines), lines  # facility daemon (3), INFO (6)
        finally:
            daemon.terminate()
            daemon.wait(15)
    syslog.close()


def test_each_check_sees_the_mount_table_as_it_is_now(workdir, make_fs):
    """CHECK reuses the last parse of the mount table only while it reads the same: a
    configured filesystem mounted or unmounted since the last CHECK counts at once (not
    mounted, it vetoes the backup)."""
    a, b = make_fs("ext4"), make_fs("ext4")
    subprocess.run(["umount", b.mountpoint], check=True)
    with running_agent(workdir, [a.mountpoint, b.mountpoint]) as agent:
        seen = []
        for step in ("as started", "b mounted", "b unmounted", "b mounted again"):
            if "mounted" in step:
                subprocess.run(["umount" if "unmounted" in step else "mount"]
                               + ([] if "unmounted" in step else [b.device]) + [b.mountpoint],
                               check=True)
            for _ in range(2):  # the second CHECK of each step is the one that may reuse
                seen.append((step, agent.sim.request("check").status == lw.HV_S_OK))
        assert seen == [(step, ok) for step, ok in (("as started", False), ("b mounted", True),
                                                     ("b unmounted", False),
                                                     ("b mounted again", True))
                        for _ in range(2)], agent.log()[-2000:]
        assert wait_for(lambda: "CHECK: 2 filesystem(s) can be frozen" in agent.log())


def test_a_check_s_verdict_is_logged_when_it_changes_not_at_every_check(workdir, make_fs):
    """Every veto is logged; a yes only when it differs from the last CHECK's (the parent
    writes each line the child sends, between one host request and the next)."""
    a, b = make_fs("ext4"), make_fs("ext4")
    agent = Agent(workdir, [a.mountpoint, b.mountpoint])
    agent.debug = False  # as shipped: info and above
    try:
        agent.start()
        for change in (None, None, None, ["umount", b.mountpoint], None,
                       ["mount", b.device, b.mountpoint], None):
            if change:
                subprocess.run(change, check=True)
            agent.sim.request("check")
        assert wait_for(lambda: agent.log().count("CHECK vetoed by") == 2), agent.log()[-2000:]
        assert agent.log().count("CHECK: 2 filesystem(s) can be frozen") == 2, agent.log()[-2000:]
    finally:
        agent.stop()


def test_a_filesystem_someone_else_froze_is_counted_and_left_frozen_to_them(workdir, make_fs):
    """FIFREEZE answers EBUSY on a filesystem already frozen (here by hand, as an
    administrator or another tool would): FREEZE counts it and succeeds, and THAW leaves
    it frozen, since that freeze is not the agent's to end; the child lets go of the
    descriptor it opened for it at once."""
    a, b = make_fs("ext4"), make_fs("ext4")
    fd = os.open(b.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
        with running_agent(workdir, [a.mountpoint, b.mountpoint]) as agent:
            before = os.listdir(f"/proc/{agent.child.pid}/fd")
            assert agent.sim.request("freeze").status == lw.HV_S_OK
            assert len(os.listdir(f"/proc/{agent.child.pid}/fd")) == len(before) + 1  # a's
            assert agent.sim.request("thaw").status == lw.HV_S_OK
            assert sorted(os.listdir(f"/proc/{agent.child.pid}/fd")) == sorted(before)
            assert_writable(a.mountpoint)
            assert_blocked(b.mountpoint)  # still the administrator's freeze
            # logged while frozen, so held until the thaw
            assert wait_for(lambda: "already frozen by someone else" in agent.log())
    finally:
        fcntl.ioctl(fd, FITHAW, 0)
        os.close(fd)
    assert_writable(b.mountpoint)
