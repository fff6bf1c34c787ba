"""`hv-vss-agent simulator`: serve in one process, check/freeze/thaw from others, the real
agent in between; and the agent's refusal to serve a simulator with nothing to restrict
what it freezes."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator

import pytest

from agent.config import AgentConfig
from agent.engine import root
from agent.errors import StartupError
from agent.simulator.server import Simulator
from privileged.child_config import ChildConfig, FreezeConfig
from tests.helpers import PY, REPO, assert_blocked, assert_writable, wait_for, write_config
from tests.test_cli import one_line_error, run

REFUSAL = ("is a simulator's socket and the config has no [freeze] only, so a simulated FREEZE "
           "would freeze every filesystem here, / included: list scratch filesystems in "
           "[freeze] only, or pass --simulator-may-freeze-all")


class Served:
    """`hv-vss-agent simulator serve PATH`, its output in a file."""

    def __init__(self, path: str, *args: str) -> None:
        self.path = path
        self.out = path + ".out"
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen([PY, "-m", "agent", "simulator", "serve", path, *args],
                                         stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        assert wait_for(lambda: os.path.exists(path + ".host"), 20), self.output()

    def output(self) -> str:
        with open(self.out, encoding="utf-8") as f:
            return f.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)


@pytest.fixture
def served(workdir) -> Iterator[Served]:
    s = Served(os.path.join(workdir, "vss.sock"))
    try:
        yield s
    finally:
        s.stop()


def host(path: str, op: str) -> subprocess.CompletedProcess[str]:
    return run("simulator", op, path, timeout=60)


def test_serve_then_check_freeze_thaw_from_other_terminals(workdir, ext4_xfs, served):
    mounts = [fs.mountpoint for fs in ext4_xfs]
    cfg = write_config(os.path.join(workdir, "agent.toml"), mounts, workdir, frontend=False)
    with open(os.path.join(workdir, "agent.log"), "wb") as log:
        agent = subprocess.Popen([PY, "-m", "agent", "-n", "--config", cfg, "--device",
                                  served.path], stderr=log, cwd=REPO)
    try:
        assert wait_for(lambda: "the daemon is registered" in served.output(), 30), \
            served.output()
        check = host(served.path, "check")
        assert (check.returncode, check.stderr) == (0, "")
        assert check.stdout.startswith("CHECK: HV_S_OK, answered by the daemon, after ")
        assert check.stdout.rstrip().endswith("the daemon wrote 00000000 00000000 00000000")

        freeze = host(served.path, "freeze")
        assert freeze.returncode == 0 and freeze.stdout.startswith("FREEZE: HV_S_OK")
        probes = [assert_blocked(m, 0.3) for m in mounts]  # really frozen

        thaw = host(served.path, "thaw")
        assert thaw.returncode == 0 and thaw.stdout.startswith("THAW: HV_S_OK")
        for p in probes:
            assert p.done_within(5)
        for m in mounts:
            assert_writable(m)
        text = served.output()
        for line in ("a daemon opened the device (connection 1)",
                     "driver: VSS: userspace daemon ver. 129 connected",
                     "host FREEZE -> HV_S_OK (answered by the daemon, "):
            assert line in text, text
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(15)
    assert wait_for(lambda: "no daemon is registered" in served.output())
    gone = host(served.path, "freeze")  # no daemon: vss_handle_request fails it at once
    assert gone.returncode == 1
    assert gone.stdout.startswith("FREEZE: HV_E_FAIL (0x80004005), answered by the kernel")
    assert served.stop() == 0
    assert not os.path.exists(served.path) and not os.path.exists(served.path + ".host")
    assert served.output().rstrip().endswith("stopped")


def test_serve_the_freebsd_model(workdir, served):
    """A second simulator on another path, FreeBSD's driver: before any daemon has
    opened the device a request is not even read (hv_vss_callback), so it waits."""
    other = Served(os.path.join(workdir, "bsd.sock"), "--protocol", "freebsd")
    try:
        assert "the freebsd driver model (sys/dev/hyperv/utilities/hv_snapshot.c)" \
            in other.output()
        pending = subprocess.Popen([PY, "-m", "agent", "simulator", "check", other.path,
                                    "--timeout", "0.5"], cwd=REPO, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = pending.communicate(timeout=30)
        assert pending.returncode == 1 and out == ""
        assert err.strip() == ("hv-vss-agent simulator check: no answer within 0.5 s (the "
                               "FreeBSD driver ignores a request that arrives while another "
                               "is pending)")
    finally:
        assert other.stop() == 0


def test_host_commands_without_a_simulator_say_so_in_one_line(workdir):
    path = os.path.join(workdir, "nothing.sock")
    one_line_error(host(path, "freeze"), 1, f"hv-vss-agent simulator freeze: no simulator "
                   f"serves on {path} (start `hv-vss-agent simulator serve {path}` first)")


def test_serve_never_replaces_a_file_or_a_live_simulator(workdir, served):
    precious = os.path.join(workdir, "precious")
    with open(precious, "w", encoding="utf-8") as f:
        f.write("keep")
    one_line_error(run("simulator", "serve", precious), 1,
                   f"{precious} exists and is not a socket: choose another path")
    with open(precious, encoding="utf-8") as f:
        assert f.read() == "keep"
    one_line_error(run("simulator", "serve", served.path), 1,
                   f"{served.path} is in use: a simulator already serves there")
    assert host(served.path, "check").stdout.startswith("CHECK: HV_E_FAIL")  # still serving


@pytest.mark.parametrize(("args", "text"), [
    ((), "the following arguments are required: serve|check|freeze|thaw"),
    (("freeze",), "the following arguments are required: PATH"),
    (("hibernate", "/tmp/x"), "invalid choice: 'hibernate'"),
    (("serve", "/tmp/x", "--protocol", "windows"), "invalid choice: 'windows'"),
])
def test_simulator_usage_errors(args, text):
    one_line_error(run("simulator", *args), 2, text)


# --- the agent refuses a simulator with no [freeze] only ------------------------------------------


def test_agent_refuses_a_simulator_when_the_config_has_no_freeze_only(workdir):
    cfg = write_config(os.path.join(workdir, "all.toml"), [], workdir, frontend=False)
    sock = os.path.join(workdir, "vss.sock")
    with Simulator(sock) as sim:
        proc = run("-n", "--config", cfg, "--device", sock)
        one_line_error(proc, 1, f"hv-vss-agent: {sock} {REFUSAL}")
        assert sim.connections == 0  # refused before it even opened the device


def test_agent_refuses_a_simulator_that_appears_after_start_up(workdir):
    """The device path does not exist yet: the agent waits, and once it is open and turns
    out to be a socket, refuses before its root child starts."""
    cfg = write_config(os.path.join(workdir, "all.toml"), [], workdir, frontend=False)
    sock = os.path.join(workdir, "late.sock")
    err_path = os.path.join(workdir, "late.err")

    def stderr() -> str:
        with open(err_path, encoding="utf-8") as f:
            return f.read()

    with open(err_path, "wb") as err:
        proc = subprocess.Popen([PY, "-m", "agent", "-n", "--config", cfg, "--device", sock],
                                stderr=err, cwd=REPO)
    sim = Simulator(sock)
    try:
        assert wait_for(lambda: "waiting for" in stderr(), 30), stderr()
        sim.start()
        assert proc.wait(30) == 1, stderr()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sim.stop()
    lines = stderr().strip().splitlines()
    assert len(lines) == 2 and "waiting for" in lines[0], lines
    assert lines[1] == f"hv-vss-agent: {sock} {REFUSAL}"
    assert sim.connections == 1 and not sim.driver.registered


def test_agent_serves_a_simulator_with_no_freeze_only_when_told_to(workdir):
    """The flag lets it start: it registers.  (No FREEZE is sent: it would freeze /.)"""
    cfg = write_config(os.path.join(workdir, "all.toml"), [], workdir, frontend=False)
    sock = os.path.join(workdir, "vss.sock")
    log_path = os.path.join(workdir, "a.log")

    def logged() -> str:
        with open(log_path, encoding="utf-8") as f:
            return f.read()

    with Simulator(sock) as sim, open(log_path, "wb") as log:
        proc = subprocess.Popen([PY, "-m", "agent", "-n", "--config", cfg, "--device", sock,
                                 "--simulator-may-freeze-all"], stderr=log, cwd=REPO)
        try:
            sim.wait_registered(30)
            assert wait_for(lambda: "registered with the kernel" in logged(), 30), logged()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
    assert "simulator's socket" not in logged()


def test_the_refusal_is_only_for_sockets():
    everything = AgentConfig(device="/dev/vmbus/hv_vss")
    root.refuse_simulator_freezing_all(everything, is_socket=False)  # the real device
    restricted = AgentConfig(device="/x.sock",
                             child=ChildConfig(freeze=FreezeConfig(only=("/mnt/scratch",))))
    root.refuse_simulator_freezing_all(restricted, is_socket=True)
    with pytest.raises(StartupError, match=r"pass --simulator-may-freeze-all$"):
        root.refuse_simulator_freezing_all(everything, is_socket=True)
