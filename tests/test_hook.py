"""`hv-vss-agent hook`: qemu-ga's fsfreeze-hook convention, run by an unprivileged user.

The hooks write to the scratch filesystem itself: a write to a frozen filesystem
blocks, so a hook that finished its write proves the filesystem was writable when
it ran.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import psutil
import pytest

from agent.clients.hook import default_name
from agent.dev.scratch import ScratchFS
from agent.kernel import linux_wire as lw
from tests.helpers import (
    PY,
    REPO,
    USER_PY,
    Agent,
    assert_blocked,
    assert_writable,
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


# An application lock held from freeze to thaw, in the pattern of qemu's MySQL sample
# (fsfreeze-hook.d/mysql-flush.sh.sample): the freeze hook starts a background process
# that takes the lock and waits on a FIFO, and returns once the lock is taken; the
# background process keeps the hook's output open.  The thaw hook writes to the FIFO.
LOCK_HOOK = """#!/bin/sh
STATE={state}
case "$1" in
freeze)
    echo "$$" > "$STATE/freeze.sid"
    rm -f "$STATE/release" "$STATE/locked"
    mkfifo "$STATE/release" || exit 1
    (
        flock 9 || exit 1
        echo locked > "$STATE/locked"
        read line < "$STATE/release"
        echo "released by the thaw hook"
    ) 9> "$STATE/app.lock" &
    echo "$!" > "$STATE/holder.pid"
    while [ ! -e "$STATE/locked" ]; do sleep 0.05; done
    echo "lock taken"
    ;;
thaw)
    [ -p "$STATE/release" ] || exit 1
    echo > "$STATE/release"
    rm -f "$STATE/release"
    ;;
esac
"""

# A dispatcher in the pattern of qemu-ga's fsfreeze-hook: runs fsfreeze-hook.d/* next
# to itself, appends everything to its log, and exits 0 whatever happened.
DISPATCHER = """#!/bin/sh
LOGFILE={logfile}
HOOKS_D=$(dirname -- "$(realpath "$0")")/fsfreeze-hook.d
[ -d "$HOOKS_D" ] || exit 0
for file in "$HOOKS_D"/*; do
    case "$file" in *~ | *.sample | *.dpkg-*) continue ;; esac
    [ -x "$file" ] || continue
    echo "running $file $@" >> $LOGFILE
    "$file" "$@" >> $LOGFILE 2>&1
    echo "$file: status $?" >> $LOGFILE
done
exit 0
"""


def freeze_hook(workdir: str, name: str, body: str) -> str:
    """A hook that does `body` on freeze and nothing on thaw."""
    return write_hook(os.path.join(workdir, name),
                      f'#!/bin/sh\n[ "$1" = freeze ] || exit 0\n{body}')


def state_dir(workdir: str) -> str:
    """A directory of the unprivileged hook's own, outside the frozen filesystem."""
    d = os.path.join(workdir, "app-state")
    os.mkdir(d)
    os.chown(d, NOBODY, NOBODY)
    return d


def lock_hook(workdir: str) -> tuple[str, str]:
    """LOCK_HOOK, installed, and the directory it keeps its lock and FIFO in."""
    state = state_dir(workdir)
    return write_hook(os.path.join(workdir, "lock-hook"), LOCK_HOOK.format(state=state)), state


def lock_held(state: str) -> bool:
    fd = os.open(os.path.join(state, "app.lock"), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def session(sid: int) -> list[psutil.Process]:
    """The processes still alive in a hook's session (its pid): it and what it started."""
    alive = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
    return alive


def hook_log(workdir: str) -> str:
    with open(os.path.join(workdir, "hook.err"), encoding="utf-8", errors="replace") as f:
        return f.read()


@contextlib.contextmanager
def hooked_agent(workdir: str, fs: ScratchFS, hook: str, *args: str,
                 notify: dict[str, object] | None = None,
                 user: int | None = NOBODY) -> Iterator[tuple[Agent, subprocess.Popen[bytes]]]:
    """The agent, freezing `fs`, with `hook --exec HOOK ARGS` subscribed to it."""
    with running_agent(workdir, [fs.mountpoint],
                       notify={"allow_users": ["nobody"], **(notify or {})}) as agent, \
            hook_client(agent.notify_socket, hook, workdir, *args, user=user) as client:
        name = default_name(os.path.abspath(hook))
        assert wait_for(lambda: f"subscriber {name} connected" in agent.log(), 15), agent.log()
        try:
            yield agent, client
        except AssertionError as e:  # what the hook client said is half the story
            raise AssertionError(f"{e}\n--- hook client:\n{hook_log(workdir)}"
                                 f"--- agent:\n{agent.log()}") from None


def gone(p: psutil.Process) -> bool:
    return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE


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
    with hooked_agent(workdir, fs, hooks) as (agent, _):
        assert agent.sim.request("freeze").status == 0
        assert agent.sim.request("thaw").status == 0
        assert wait_for(lambda: len(lines(os.path.join(data, "marker"))) == 4, 10)
        # name order, the same for freeze and thaw, as qemu-ga's dispatcher
        assert lines(os.path.join(data, "marker")) == [
            "10-first freeze", "20-second freeze", "10-first thaw", "20-second thaw"]


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_failing_hook_is_reported_at_once_and_follows_the_policy(workdir, app, policy):
    fs, _, log = app
    # It fails, but a helper it started in the background keeps its output open: the
    # failure is its exit status, reported when it exits, not a timeout at the deadline.
    hook = freeze_hook(workdir, "failing", f'sleep 30 &\necho "$!" >> {log}\n'
                       'echo "cannot flush: disk full"\nexit 3\n')
    notify = {"allow_users": ["nobody"], "policy": policy}
    with hooked_agent(workdir, fs, hook, "--timeout", "8", notify=notify) as (agent, client):
        freeze = agent.sim.request("freeze")
        assert freeze.status == (lw.HV_E_FAIL if policy == "fail" else 0)
        if policy == "skip":
            probe = assert_blocked(fs.mountpoint, 0.3)
            assert agent.sim.request("thaw").status == 0
            assert probe.done_within(5)
        assert wait_for(lambda: "failing freeze: exit status 3: cannot flush: disk full"
                        in agent.log()), agent.log()
        helper = psutil.Process(int(lines(log)[0]))
        assert helper.is_running()
        client.terminate()
        assert client.wait(10) == 0
    # nothing the hook started outlives the client
    assert wait_for(lambda: gone(helper), 5)


def test_hook_that_hangs_is_killed_at_its_deadline_with_all_it_started(workdir, app):
    fs, _, log = app
    # A hook that logs to a file of its own closes our pipe at once: end of file on its
    # output says nothing about whether it still runs.
    hook = freeze_hook(workdir, "slow", f'exec >> {log} 2>&1\necho "$$"\nsleep 61 &\nsleep 60\n')
    with hooked_agent(workdir, fs, hook, "--timeout", "1") as (agent, _):
        freeze = agent.sim.request("freeze")
        assert freeze.status == lw.HV_E_FAIL
        assert wait_for(lambda: "slow freeze: killed after" in agent.log()), agent.log()
        hook_sid = int(lines(log)[0])
        assert wait_for(lambda: not session(hook_sid), 5), \
            f"the timed-out hook is still running: {session(hook_sid)}"


def test_background_lock_holder_spans_the_freeze_and_is_released_after_the_thaw(workdir, app):
    fs, _, _ = app
    hook, state = lock_hook(workdir)
    with hooked_agent(workdir, fs, hook, "--timeout", "8") as (agent, _):
        # the hook returned with the lock taken: FREEZE does not wait for its output to end
        assert agent.sim.request("freeze").status == 0
        assert "lock-hook freeze: ok" in hook_log(workdir)  # logged before it answered
        holder = psutil.Process(int(lines(os.path.join(state, "holder.pid"))[0]))
        probe = assert_blocked(fs.mountpoint, 0.3)
        assert lock_held(state) and holder.is_running()  # across the freeze

        assert agent.sim.request("thaw").status == 0
        assert probe.done_within(5)
        assert wait_for(lambda: not lock_held(state), 10), "the thaw hook did not release it"
        assert wait_for(lambda: gone(holder), 5)
        # what the holder wrote after its hook had returned is in the log too
        assert wait_for(lambda: "lock-hook freeze: released by the thaw hook"
                        in hook_log(workdir), 5), hook_log(workdir)
        assert "lock-hook freeze: lock taken" in hook_log(workdir)


def test_stopping_the_client_mid_hook_leaves_nothing_behind(workdir, app):
    fs, _, log = app
    hook = freeze_hook(workdir, "stuck", f'sleep 61 &\necho "$$" >> {log}\nsleep 60\n')
    with hooked_agent(workdir, fs, hook, "--timeout", "8") as (agent, client):
        freeze = agent.sim.send("freeze")
        assert wait_for(lambda: lines(log), 10), "the freeze hook did not start"
        hook_sid = int(lines(log)[0])
        assert len(session(hook_sid)) >= 2  # the hook and its background sleep
        client.send_signal(signal.SIGTERM)
        assert client.wait(10) == 0
        assert wait_for(lambda: not session(hook_sid), 5), \
            f"left behind: {session(hook_sid)}"
        assert agent.sim.wait(freeze).status == lw.HV_E_FAIL  # the subscriber went away


def test_stopping_the_client_between_freeze_and_thaw_releases_the_lock(workdir, app):
    fs, _, _ = app
    hook, state = lock_hook(workdir)
    with hooked_agent(workdir, fs, hook, "--timeout", "8") as (agent, client):
        assert agent.sim.request("freeze").status == 0
        sid = int(lines(os.path.join(state, "freeze.sid"))[0])
        assert lock_held(state) and session(sid)
        client.terminate()
        assert client.wait(10) == 0
        assert wait_for(lambda: not session(sid), 5), f"left behind: {session(sid)}"
        assert not lock_held(state)
        assert agent.sim.request("thaw").status == 0


def test_thaw_hooks_run_when_the_agent_goes_away_after_freeze(workdir, app):
    fs, _, _ = app
    hook, state = lock_hook(workdir)
    with hooked_agent(workdir, fs, hook, "--timeout", "8", "--wait") as (agent, _):
        assert agent.sim.request("freeze").status == 0
        assert lock_held(state)
        assert agent.proc is not None
        agent.proc.kill()  # no THAW will come; its root child thaws on end of file
        agent.proc.wait(10)
        assert_writable(fs.mountpoint)
        assert wait_for(lambda: not lock_held(state), 10), hook_log(workdir)
        assert "after FREEZE: running the thaw hooks" in hook_log(workdir)


def test_a_thaw_hook_that_hangs_does_not_keep_the_next_from_resuming(workdir, app):
    fs, _, _ = app
    state = state_dir(workdir)
    hooks = os.path.join(workdir, "hooks.d")
    os.mkdir(hooks)
    write_hook(os.path.join(hooks, "10-hangs-on-thaw"),
               '#!/bin/sh\n[ "$1" = thaw ] && sleep 60\nexit 0\n')
    write_hook(os.path.join(hooks, "20-lock"), LOCK_HOOK.format(state=state))
    with hooked_agent(workdir, fs, hooks, "--timeout", "2") as (agent, _):
        assert agent.sim.request("freeze").status == 0
        assert lock_held(state)
        assert agent.sim.request("thaw").status == 0
        assert wait_for(lambda: "10-hangs-on-thaw thaw: killed after" in hook_log(workdir), 10)
        # the next thaw hook had its own time, not what the first one left
        assert wait_for(lambda: not lock_held(state), 5), hook_log(workdir)
        assert wait_for(lambda: "20-lock thaw: ok" in hook_log(workdir), 5)


def test_check_does_not_wait_behind_thaw_hooks_and_a_freeze_past_its_time_runs_none(
        workdir, app):
    fs, data, _ = app
    hooks = os.path.join(workdir, "hooks.d")
    os.mkdir(hooks)
    release = os.path.join(workdir, "release")
    # Every hook has 4.5 s.  The thaw hooks take longer than that together (the second
    # one until the test lets it go), so a FREEZE that comes meanwhile runs out of time.
    write_hook(os.path.join(hooks, "10-slow-thaw"),
               f'#!/bin/sh\necho "10 $1" >> {data}/marker\n[ "$1" = thaw ] && sleep 3\nexit 0\n')
    write_hook(os.path.join(hooks, "20-held-thaw"),
               f'#!/bin/sh\necho "20 $1" >> {data}/marker\n[ "$1" = thaw ] || exit 0\n'
               f'while [ ! -e {release} ]; do sleep 0.05; done\n')
    notify = {"allow_users": ["nobody"], "timeout": 5.0}
    with hooked_agent(workdir, fs, hooks, notify=notify) as (agent, _):
        assert agent.sim.request("freeze").status == 0
        assert agent.sim.request("thaw").status == 0  # the host does not wait for thaw hooks
        assert agent.sim.request("check").status == 0  # nothing to run: answered at once
        assert agent.sim.request("freeze").status == lw.HV_E_FAIL  # we were still thawing
        with open(release, "w"):
            pass
        assert agent.sim.request("thaw").status == 0
        assert wait_for(lambda: "freeze: not run, no time left" in hook_log(workdir), 10), \
            hook_log(workdir)
        time.sleep(0.5)
        # the late FREEZE ran no hook, so its THAW ran none either
        assert lines(os.path.join(data, "marker")) == ["10 freeze", "20 freeze", "10 thaw",
                                                       "20 thaw"]
        assert "20-held-thaw thaw: ok" in hook_log(workdir)


def qemu_layout(workdir: str, data: str, log: str, state: str) -> tuple[str, str, str]:
    """/etc/qemu as qemu-ga users have it: the dispatcher, and fsfreeze-hook.d with their
    hooks and a packaged sample, all root's; the dispatcher's log where only root writes."""
    etc = os.path.join(workdir, "etc-qemu")
    hooks_d = os.path.join(etc, "fsfreeze-hook.d")
    os.makedirs(hooks_d, mode=0o755)
    logdir = os.path.join(workdir, "var-log")
    os.mkdir(logdir, 0o755)
    logfile = os.path.join(logdir, "qga-fsfreeze-hook.log")
    dispatcher = write_hook(os.path.join(etc, "fsfreeze-hook"),
                            DISPATCHER.format(logfile=logfile))
    write_hook(os.path.join(hooks_d, "10-lock.sh"), LOCK_HOOK.format(state=state))
    write_hook(os.path.join(hooks_d, "20-app.sh"), HOOK.format(tag="20-app", log=log, data=data))
    for ignored in ("30-app.sh.sample", "20-app.sh~"):
        write_hook(os.path.join(hooks_d, ignored), HOOK.format(tag=ignored, log=log, data=data))
    return dispatcher, hooks_d, logfile


def test_qemu_hook_directory_run_directly_by_an_unprivileged_user(workdir, app):
    fs, data, log = app
    state = state_dir(workdir)
    dispatcher, hooks_d, logfile = qemu_layout(workdir, data, log, state)
    marker = os.path.join(data, "marker")

    # The dispatcher as nobody: it cannot write its log, runs nothing, and exits 0...
    r = subprocess.run([dispatcher, "freeze"], user=NOBODY, group=NOBODY, extra_groups=[],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "Permission denied" in r.stderr
    assert lines(marker) == [] and not os.path.exists(logfile)
    # ...so `hook` refuses it and names the directory to give instead.
    r = cli("hook", "--exec", dispatcher, "--socket", os.path.join(workdir, "none.sock"),
            user="nobody", group="nogroup", extra_groups=[])
    assert r.returncode == 1
    assert "cannot write its log" in r.stderr and f"--exec {hooks_d}" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr

    with hooked_agent(workdir, fs, hooks_d, "--timeout", "8") as (agent, _):
        assert agent.sim.request("freeze").status == 0
        probe = assert_blocked(fs.mountpoint, 0.3)
        assert lock_held(state)
        assert lines(marker) == ["20-app freeze"]
        assert agent.sim.request("thaw").status == 0
        assert probe.done_within(5)
        assert wait_for(lambda: not lock_held(state), 10), hook_log(workdir)
        assert wait_for(lambda: lines(marker) == ["20-app freeze", "20-app thaw"], 10)
        assert "hook(s)" in hook_log(workdir) and "is qemu-ga's" not in hook_log(workdir)


def test_qemu_dispatcher_runs_unchanged_as_root_with_a_warning(workdir, app):
    fs, data, log = app
    state = state_dir(workdir)
    dispatcher, hooks_d, logfile = qemu_layout(workdir, data, log, state)
    with hooked_agent(workdir, fs, dispatcher, "--timeout", "8", user=None) as (agent, _):
        assert "it exits 0 whatever its hooks do" in hook_log(workdir)
        assert agent.sim.request("freeze").status == 0
        probe = assert_blocked(fs.mountpoint, 0.3)
        assert lock_held(state)
        assert lines(os.path.join(data, "marker")) == ["20-app freeze"]
        assert agent.sim.request("thaw").status == 0
        assert probe.done_within(5)
        assert wait_for(lambda: not lock_held(state), 10)
        # (the lock holder, whose output is the dispatcher's log, may write after that line)
        assert wait_for(lambda: lines(logfile).count(f"{hooks_d}/20-app.sh: status 0") == 2, 10)
        # called at the right moments, every hook in order, the samples left out
        assert [x for x in lines(logfile) if x.startswith("running")] == [
            f"running {hooks_d}/{hook} {arg}" for arg in ("freeze", "thaw")
            for hook in ("10-lock.sh", "20-app.sh")]


def test_dispatcher_with_another_way_to_log_is_not_refused(workdir):
    hooks_d = os.path.join(workdir, "fsfreeze-hook.d")
    os.mkdir(hooks_d)
    fallback = DISPATCHER.replace("[ -d", '[ -w "$LOGFILE" ] || LOGFILE=/dev/null  # logger\n[ -d')
    dispatcher = write_hook(os.path.join(workdir, "fsfreeze-hook"),
                            fallback.format(logfile="/var/log/qga-fsfreeze-hook.log"))
    r = cli("hook", "--exec", dispatcher, "--socket", os.path.join(workdir, "none.sock"),
            user="nobody", group="nogroup", extra_groups=[])
    assert r.returncode == 1 and "cannot subscribe" in r.stderr, r.stderr


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
        assert "permission denied (not in the agent's [notify] allow_users or allow_groups?)" \
            in r.stderr
