"""The command line: every bad input is one line on stderr and a non-zero exit."""

from __future__ import annotations

import os
import subprocess

import psutil
import pytest

from tests.helpers import PY, REPO, Agent, assert_blocked, write_config


def run(*args: str, user: str | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    cmd = [PY, "-m", "agent", *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          check=False)


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert proc.returncode == code, proc
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert text in lines[0], lines[0]


def test_help_shows_the_stock_flags():
    proc = run("-h")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "-n stay in the foreground" in text
    assert "-d debug output" in text


@pytest.mark.parametrize(("args", "text"), [
    (("--bogus",), "unrecognized arguments: --bogus"),
    (("-x",), "unrecognized arguments: -x"),
    (("--protocol", "windows"), "invalid choice: 'windows'"),
    (("--cycles", "many"), "invalid int value: 'many'"),
    (("simulator", "check", "/nonexistent", "--timeout", "nan"), "between 0.1 and 3600 seconds"),
    (("simulator", "thaw", "/nonexistent", "--timeout", "-1"), "between 0.1 and 3600 seconds"),
])
def test_usage_errors(args, text):
    one_line_error(run(*args), 2, text)


def test_bad_config_files(workdir):
    one_line_error(run("--config", os.path.join(workdir, "nope.toml")), 1, "does not exist")
    bad = os.path.join(workdir, "bad.toml")
    with open(bad, "w", encoding="utf-8") as f:
        f.write("[watchdog]\nmax_frozen_seconds = 'long'\n")
    os.chmod(bad, 0o600)
    one_line_error(run("--config", bad), 1, "[watchdog] max_frozen_seconds: expected a number")
    os.chmod(bad, 0o666)
    one_line_error(run("--config", bad), 1, "writable by group or others")


def test_a_config_that_is_a_fifo_is_refused_without_waiting_for_a_writer(workdir):
    """Opened without blocking: root would otherwise wait for whoever writes the FIFO."""
    fifo = os.path.join(workdir, "c.toml")
    os.mkfifo(fifo, 0o600)
    one_line_error(run("--config", fifo, timeout=10), 1, "is not a regular file")


def test_a_detached_agent_refuses_to_log_to_stderr(workdir):
    """Detached, its stderr is /dev/null: the log would be lost.  (Without the check the
    next one answers: the device below is a socket and nothing limits what is frozen.)"""
    import socket

    device = os.path.join(workdir, "sim.sock")
    socket.socket(socket.AF_UNIX).bind(device)
    cfg = os.path.join(workdir, "c.toml")
    with open(cfg, "w", encoding="utf-8") as f:
        f.write(f'[device]\npath = "{device}"\n[log]\ntarget = "stderr"\n')
    os.chmod(cfg, 0o600)
    one_line_error(run("--config", cfg), 1, '[log] target = "stderr" needs -n')


def test_simulate_rejects_nonsense(workdir):
    """A bad command line (exit status 2, as hv-vss-agent(8) says), not a failed demo."""
    for bad in (("--cycles", "0"), ("--hold", "0"), ("--hold", "nan"), ("--hold", "-1")):
        one_line_error(run("--simulate", *bad), 2, "--cycles must be at least 1 and --hold "
                                                   "positive")
    one_line_error(run("--cycles", "2"), 2, "--cycles is for --simulate")
    one_line_error(run("--hold", "2", "-n"), 2, "--hold is for --simulate")


def test_not_root(workdir):
    cfg = write_config(os.path.join(workdir, "c.toml"), ["/nonexistent"], workdir)
    os.chmod(cfg, 0o644)
    one_line_error(run("--config", cfg, "-n", user="hvvss"), 1, "must be started as root")


def test_missing_account_says_how_to_create_it(workdir):
    cfg = write_config(os.path.join(workdir, "c.toml"), ["/nonexistent"], workdir,
                       extra="")
    with open(cfg, encoding="utf-8") as f:
        text = f.read().replace('user = "hvvss"', 'user = "no-such-user"')
    with open(cfg, "w", encoding="utf-8") as f:
        f.write(text)
    one_line_error(run("--config", cfg, "-n"), 1, "useradd --system")


def test_bad_chroot_directory(workdir):
    cfg = write_config(os.path.join(workdir, "c.toml"), ["/nonexistent"], workdir)
    chroot = os.path.join(workdir, "empty")
    os.chmod(chroot, 0o777)
    one_line_error(run("--config", cfg, "-n"), 1, "is writable by group or others")
    os.chmod(chroot, 0o755)
    open(os.path.join(chroot, "file"), "w").close()
    one_line_error(run("--config", cfg, "-n"), 1, "is not empty")


def test_a_config_the_child_cannot_read_stops_the_agent_before_it_registers(workdir, make_fs):
    """Valid TOML that the child's plain reader does not read (an escape in a string): root
    reads it with tomllib and starts the child; unprivileged, the parent reads the text as
    the child does and stops with that reader's line, before it registers with the kernel,
    so no request is ever served on a reading nobody compared."""
    fs = make_fs("ext4")
    agent = Agent(workdir, [fs.mountpoint], frontend=False,
                  extra='[check]\nmode = "d\\u0065fault"\n')
    agent.sim.start()
    try:
        proc = run("-n", "--config", agent.config, "--device", agent.socket)
        one_line_error(proc, 1, "line 19: a backslash in a \"string\"")
        assert agent.sim.connections == 1 and not agent.sim.registered()
    finally:
        agent.sim.stop()


def test_second_daemon_is_refused_before_its_child_can_touch_anything(workdir, make_fs):
    """Same config, same state directory: a child of the second daemon would start by
    thawing what the crash record names, the first daemon's freeze included."""
    fs = make_fs("ext4")
    first = Agent(workdir, [fs.mountpoint]).start()
    try:
        assert first.sim.request("freeze").status == 0
        probe = assert_blocked(fs.mountpoint, 0.3)
        proc = run("-n", "--config", first.config, "--device", first.socket)
        one_line_error(proc, 1, "busy: another VSS daemon has it open")
        assert first.sim.refused == 1
        assert not probe.done_within(0.5), "the second daemon thawed the first one's freeze"
        assert first.sim.request("thaw").status == 0
        assert probe.done_within(5)
    finally:
        first.stop()


def test_daemon_mode_without_syslog_says_what_to_do(workdir):
    cfg = write_config(os.path.join(workdir, "c.toml"), ["/nonexistent"], workdir,
                       extra=f'[log]\nsyslog_socket = "{workdir}/no-syslog"\n')
    try:
        one_line_error(run("--config", cfg), 1, "cannot log to syslog at")
    finally:  # had it detached after all, it would wait for the device forever
        for p in psutil.process_iter(["cmdline"]):
            if cfg in (p.info["cmdline"] or []):
                p.kill()
