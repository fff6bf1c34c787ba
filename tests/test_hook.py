"""`hv-vss-agent hook`: qemu-ga's fsfreeze-hook convention, run by an unprivileged user.

The hooks write to the scratch filesystem itself: a write to a frozen filesystem
blocks, so a hook that finished its write proves the filesystem was writable when
it ran.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from agent.kernel import linux_wire as lw
from tests.helpers import (
    PY,
    REPO,
    USER_PY,
    Agent,
    assert_blocked,
    cli,
    running_agent,
    wait_for,
)

NOBODY = 65534

HOOK = """#!/bin/sh
# an fsfreeze-hook as qemu-ga would call it: $1 is freeze or thaw
echo "{tag} $1 start" >> {log}
echo "{tag} $1" >> {data}/marker
echo "{tag} $1 done" >> {log}
"""


def write_hook(path: str, text: str, mode: int = 0o755) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


@contextlib.contextmanager
def hook_client(agent_socket: str, hook: str, workdir: str, *args: str,
                user: int | None = NOBODY) -> Iterator[subprocess.Popen[bytes]]:
    err = open(os.path.join(workdir, "hook.err"), "ab")
    proc = subprocess.Popen([USER_PY if user else PY, "-m", "agent", "hook", "--exec",
                             hook, "--socket", agent_socket, *args],
                            cwd=REPO, user=user, group=user, extra_groups=[] if user else None,
                            stderr=err)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)
        err.close()


def lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


@pytest.fixture
def app(workdir, make_fs):
    """A scratch filesystem with a directory the unprivileged hook may write to."""
    fs = make_fs("ext4")
    data = os.path.join(fs.mountpoint, "app")
    os.mkdir(data)
    os.chown(data, NOBODY, NOBODY)
    log = os.path.join(workdir, "hooks.log")
    with open(log, "w"):
        pass
    os.chmod(log, 0o666)
    return fs, data, log


def test_hook_runs_freeze_before_and_thaw_after_as_its_own_user(workdir, app):
    fs, data, log = app
    hook = write_hook(os.path.join(workdir, "fsfreeze-hook"),
                      HOOK.format(tag="hook", log=log, data=data))
    with running_agent(workdir, [fs.mountpoint], notify={"allow_users": ["nobody"]}) as agent, \
            hook_client(agent.notify_socket, hook, workdir):
        assert wait_for(lambda: "subscriber hook-fsfreeze-hook connected (uid 65534" in
                        agent.log(), 15), agent.log()
        assert agent.sim.request("check").status == 0
        assert lines(log) == []  # qemu-ga's convention has nothing for CHECK

        freeze = agent.sim.request("freeze")
        assert freeze.status == 0
        # the freeze hook wrote to the filesystem, so it ran before the freeze
        assert lines(log) == ["hook freeze start", "hook freeze done"]
        probe = assert_blocked(fs.mountpoint, 0.3)
        time.sleep(0.5)
        assert lines(log) == ["hook freeze start", "hook freeze done"]  # no thaw while frozen

        assert agent.sim.request("thaw").status == 0
        assert probe.done_within(5)
        assert wait_for(lambda: lines(log)[-1:] == ["hook thaw done"], 10), lines(log)
        assert lines(os.path.join(data, "marker")) == ["hook freeze", "hook thaw"]
        st = os.stat(os.path.join(data, "marker"))
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)  # it ran as nobody, not as root


def test_hook_directory_like_fsfreeze_hook_d(workdir, app):
    fs, data, log = app
    hooks = os.path.join(workdir, "fsfreeze-hook.d")
    os.mkdir(hooks)
    for name in ("20-second", "10-first", "30-backup~", "40-old.dpkg-old", "50-sample.sample"):
        write_hook(os.path.join(hooks, name), HOOK.format(tag=name, log=log, data=data))
    write_hook(os.path.join(hooks, "60-not-executable"), HOOK.format(tag="60", log=log,
                                                                    data=data), 0o644)
    with running_agent(workdir, [fs.mountpoint], notify={"allow_users": ["nobody"]}) as agent, \
            hook_client(agent.notify_socket, hooks, workdir):
        assert wait_for(lambda: "subscriber hook-fsfreeze-hook.d connected" in agent.log(), 15)
        assert agent.sim.request("freeze").status == 0
        assert agent.sim.request("thaw").status == 0
        assert wait_for(lambda: len(lines(os.path.join(data, "marker"))) == 4, 10)
        # name order, the same for freeze and thaw, as qemu-ga's dispatcher
        assert lines(os.path.join(data, "marker")) == [
            "10-first freeze", "20-second freeze", "10-first thaw", "20-second thaw"]


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_failing_hook_is_reported_and_follows_the_policy(workdir, app, policy):
    fs, _, _ = app
    hook = write_hook(os.path.join(workdir, "failing"),
                      '#!/bin/sh\n[ "$1" = freeze ] || exit 0\necho "cannot flush: disk full"\n'
                      "exit 3\n")
    notify = {"allow_users": ["nobody"], "policy": policy}
    with running_agent(workdir, [fs.mountpoint], notify=notify) as agent, \
            hook_client(agent.notify_socket, hook, workdir):
        assert wait_for(lambda: "subscriber hook-failing connected" in agent.log(), 15)
        freeze = agent.sim.request("freeze")
        assert freeze.status == (lw.HV_E_FAIL if policy == "fail" else 0)
        if policy == "skip":
            probe = assert_blocked(fs.mountpoint, 0.3)
            assert agent.sim.request("thaw").status == 0
            assert probe.done_within(5)
        assert wait_for(lambda: "failing freeze: exit status 3: cannot flush: disk full"
                        in agent.log()), agent.log()


def test_hook_timeout_kills_the_hook_and_fails_the_freeze(workdir, app):
    fs, _, log = app
    hook = write_hook(os.path.join(workdir, "slow"),
                      f'#!/bin/sh\n[ "$1" = freeze ] || exit 0\necho "$$" >> {log}\nsleep 60\n')
    with running_agent(workdir, [fs.mountpoint], notify={"allow_users": ["nobody"]}) as agent, \
            hook_client(agent.notify_socket, hook, workdir, "--timeout", "1"):
        assert wait_for(lambda: "subscriber hook-slow connected" in agent.log(), 15)
        freeze = agent.sim.request("freeze")
        assert freeze.status == lw.HV_E_FAIL
        assert wait_for(lambda: "slow freeze: killed after" in agent.log()), agent.log()
        hook_pid = int(lines(log)[0])
        assert wait_for(lambda: not os.path.exists(f"/proc/{hook_pid}"), 5), \
            "the timed-out hook is still running"


def test_hook_and_status_refuse_bad_input_in_one_line(workdir):
    bad = [
        (("hook", "--exec", "/nonexistent/hook"), "No such file or directory"),
        (("hook", "--exec", workdir, "--timeout", "soon"), "not a number of seconds"),
        (("hook",), "required: --exec"),
        (("status", "--socket", os.path.join(workdir, "none.sock")), "not running: no control"),
        (("status", "--bogus"), "unrecognized arguments"),
    ]
    writable = write_hook(os.path.join(workdir, "writable"), "#!/bin/sh\n", 0o777)
    bad.append((("hook", "--exec", writable, "--socket", "/nonexistent.sock"),
                "writable by group or others"))
    bad.append((("hook", "--exec", "/bin/true", "--socket", os.path.join(workdir, "no.sock")),
                "cannot subscribe"))
    for args, message in bad:
        r = cli(*args)
        assert r.returncode != 0, args
        assert message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_hook_waits_for_the_agent_but_not_past_a_refusal(workdir, app):
    fs, data, log = app
    hook = write_hook(os.path.join(workdir, "fsfreeze-hook"),
                      HOOK.format(tag="hook", log=log, data=data))
    agent = Agent(workdir, [fs.mountpoint], notify={"allow_users": ["nobody"]})
    with hook_client(agent.notify_socket, hook, workdir, "--wait") as proc:
        time.sleep(0.5)
        assert proc.poll() is None, "--wait gave up on an agent that is not there yet"
        try:
            agent.start()
            assert wait_for(lambda: "subscriber hook-fsfreeze-hook connected" in agent.log(), 30)
            assert agent.sim.request("freeze").status == 0
            assert agent.sim.request("thaw").status == 0
            assert wait_for(lambda: lines(log)[-1:] == ["hook thaw done"], 10)
        finally:
            agent.stop()
    with running_agent(workdir, [fs.mountpoint], notify={"allow_users": []}) as agent:
        r = cli("hook", "--exec", hook, "--socket", agent.notify_socket, "--wait",
                user="nobody", group="nogroup", extra_groups=[])
        assert r.returncode == 1
        assert "refused: not in [notify] allow_users or allow_groups" in r.stderr
