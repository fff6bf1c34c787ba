"""Operator visibility: `status` / `status --json` over the control socket, and metrics."""

from __future__ import annotations

import grp
import importlib.metadata
import json
import os
import pwd
import queue
import re
import signal
import socket
import stat
import subprocess
import threading
import time

import pytest

from agent.clients.status import render_text
from agent.engine.metrics import FILENAME
from agent.kernel import linux_wire as lw
from tests.helpers import (
    PY,
    REPO,
    USER_PY,
    Agent,
    Subscriber,
    assert_blocked,
    assert_writable,
    cli,
    running_agent,
    wait_for,
)

DAEMON = 1

ASK = """\
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect", e.errno); sys.exit(0)
s.sendall(b"STATUS 1\\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
print("answer", len(data), data[:1].decode())
"""


def status_json(agent: Agent) -> dict:
    r = cli("status", "--json", "--socket", agent.control_socket)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_status_and_json_after_a_few_cycles(workdir, make_fs):
    fs = make_fs("ext4")
    with running_agent(workdir, [fs.mountpoint]) as agent:
        sub = Subscriber(agent.notify_socket, workdir, name="db")
        try:
            sub.wait_welcome()
            for _ in range(3):
                for op in ("check", "freeze", "thaw"):
                    assert agent.sim.request(op).status == 0
            assert agent.sim.request("freeze").status == 0
            probe = assert_blocked(fs.mountpoint, 0.3)
            frozen = status_json(agent)
            text_frozen = cli("status", "--socket", agent.control_socket).stdout
            assert agent.sim.request("thaw").status == 0
            assert probe.done_within(5)
            # the THAW round is reported after the reply: wait until it is in
            assert wait_for(lambda: any(s["event"] == "thaw" for s in
                                        status_json(agent)["transactions"][-1]["subscribers"]))
            st = status_json(agent)
            text = cli("status", "--socket", agent.control_socket).stdout
        finally:
            sub.stop()

        assert frozen["state"] == "frozen"
        assert frozen["frozen_mounts"] == [fs.mountpoint]
        assert frozen["frozen_since"] <= frozen["time"]
        assert "state: FROZEN for " in text_frozen and fs.mountpoint in text_frozen

        assert st["state"] == "thawed" and st["frozen_since"] is None
        assert st["agent"]["pid"] == agent.parent.pid
        assert st["agent"]["frontend_pid"] == agent.frontend.pid
        assert st["child"] == {"pid": agent.child.pid, "health": "running", "selected": 1,
                               "recovered": 0}
        assert st["kernel"] == {"connected": True}
        ops = [(t["op"], t["result"]) for t in st["transactions"]]
        assert ops == [("check", "ok"), ("freeze", "ok"), ("thaw", "ok")] * 3 \
            + [("freeze", "ok"), ("thaw", "ok")]
        freeze = st["transactions"][-2]
        assert set(freeze["seconds"]) == {"subscribers", "freeze", "reply", "total"}
        assert [(s["event"], s["name"], s["result"]) for s in freeze["subscribers"]] == \
            [("freeze", "db", "ok")]
        thaw = st["transactions"][-1]
        assert set(thaw["seconds"]) == {"thaw", "reply", "total"}
        assert [(s["event"], s["name"], s["result"]) for s in thaw["subscribers"]] == \
            [("thaw", "db", "ok")]
        c = st["counters"]
        assert (c["requests_check"], c["requests_freeze"], c["requests_thaw"]) == (3, 4, 4)
        assert (c["freezes"], c["replies_ok"]) == (4, 11)
        assert st["histograms"]["frozen"]["count"] == 4
        [db] = st["frontend"]["subscribers"]
        assert (db["name"], db["uid"], db["pid"], db["answered"]) == ("db", 0, sub.proc.pid, 11), db
        assert st["frontend"]["counters"]["subscribers_accepted"] == 1
        # the client's own additions: psutil facts about the reported processes
        procs = st["processes"]
        assert procs["root child"]["threads"] == 1 and procs["root child"]["uids"] == [0, 0, 0]
        assert procs["engine"]["rss"] > 0 and 0 not in procs["engine"]["uids"]
        assert procs["frontend"]["pid"] == agent.frontend.pid
        for words in ("state: thawed", f"root child: pid {agent.child.pid}, running",
                      "freeze: ok", "freeze db: ok", "thaw db: ok", "requests_freeze=4",
                      "engine process"):
            assert words in text, (words, text)


def test_status_reports_watchdog_and_budget(workdir, make_fs):
    fs = make_fs("ext4")
    # a budget of one window that never refills: the watchdog spends it all
    with running_agent(workdir, [fs.mountpoint], max_frozen=1.0, budget=1.0,
                       budget_per_hour=0) as agent:
        assert agent.sim.request("freeze").status == 0
        assert assert_blocked(fs.mountpoint, 0.3).done_within(5), "the watchdog did not thaw"
        assert agent.sim.request("thaw").status == lw.HV_E_FAIL
        assert agent.sim.request("freeze").status == lw.HV_E_FAIL  # the budget is spent
        st = status_json(agent)
        kinds = [e["kind"] for e in st["events"]]
        assert kinds == ["watchdog", "budget"]
        assert st["counters"]["auto_thaws"] == 1
        assert "frozen-time budget" in st["events"][1]["detail"]
        assert st["transactions"][-1]["detail"] == "FREEZE refused: Resource temporarily " \
            "unavailable"


def test_control_socket_is_for_root_and_the_admin_group_only(workdir, make_fs):
    fs = make_fs("ext4")
    with running_agent(workdir, [fs.mountpoint], control={"admin_group": "adm"}) as agent:
        st = os.stat(agent.control_socket)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert (st.st_uid, st.st_gid) == (0, grp.getgrnam("adm").gr_gid)

        def ask(**who: object) -> str:
            return subprocess.run([USER_PY, "-I", "-c", ASK, agent.control_socket],
                                  capture_output=True, text=True, timeout=30, check=True,
                                  **who).stdout.strip()  # type: ignore[call-overload]

        assert ask(user=DAEMON, group=DAEMON, extra_groups=["adm"]).startswith("answer ")
        assert ask().startswith("answer ")  # root
        assert ask(user=DAEMON, group=DAEMON, extra_groups=[]) == "connect 13"  # EACCES
        r = cli("status", "--socket", agent.control_socket, user="daemon", group="daemon",
                extra_groups=[])
        assert r.returncode == 1 and "Permission denied" in r.stderr
        assert "Traceback" not in r.stderr


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in\n{text}")


def test_metrics_textfile(workdir, make_fs):
    fs = make_fs("ext4")
    mdir = os.path.join(workdir, "metrics")
    os.mkdir(mdir, 0o755)
    os.chown(mdir, pwd.getpwnam("hvvss").pw_uid, 0)
    path = os.path.join(mdir, FILENAME)
    with running_agent(workdir, [fs.mountpoint], metrics={"dir": mdir}) as agent:
        assert wait_for(lambda: os.path.exists(path))  # written at start
        for _ in range(2):
            for op in ("check", "freeze", "thaw"):
                assert agent.sim.request(op).status == 0
        assert wait_for(lambda: "hv_vss_agent_freezes_total 2" in read(path)), read(path)

        assert agent.sim.request("freeze").status == 0
        # The engine is single-threaded: any write it started before the freeze is done.
        before, inode = read(path), os.stat(path).st_ino
        assert (metric(before, "hv_vss_agent_frozen"), metric(before, "hv_vss_agent_up")) == (1, 1)
        probe = assert_blocked(fs.mountpoint, 0.3)
        # A CHECK while frozen is refused: the engine publishes a new status, not metrics.
        assert agent.sim.request("check").status == lw.HV_E_FAIL
        assert wait_for(lambda: status_json(agent)["counters"].get("requests_check") == 3)
        assert (read(path), os.stat(path).st_ino) == (before, inode), "written while frozen"
        assert agent.sim.request("thaw").status == 0
        assert probe.done_within(5)
        assert wait_for(lambda: "hv_vss_agent_freezes_total 3" in read(path))
        text = read(path)

    assert os.listdir(mdir) == [FILENAME]  # renamed into place, no temporary left
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert '# TYPE hv_vss_agent_frozen_seconds histogram' in text
    assert metric(text, 'hv_vss_agent_requests_total{op="freeze"}') == 3
    assert metric(text, 'hv_vss_agent_replies_total{result="ok"}') == 8
    assert metric(text, 'hv_vss_agent_replies_total{result="failed"}') == 1
    assert metric(text, "hv_vss_agent_frozen_seconds_count") == 3
    assert metric(text, 'hv_vss_agent_frozen_seconds_bucket{le="+Inf"}') == 3
    assert metric(text, "hv_vss_agent_frozen_seconds_sum") > 0
    assert metric(text, "hv_vss_agent_freeze_seconds_count") == 3
    buckets = [float(line.split()[1]) for line in text.splitlines()
               if line.startswith("hv_vss_agent_frozen_seconds_bucket")]
    assert buckets == sorted(buckets)  # cumulative
    assert metric(text, "hv_vss_agent_start_time_seconds") <= time.time()
    assert metric(text, "hv_vss_agent_frozen") == 0


def metrics_dir(workdir: str) -> tuple[str, str]:
    mdir = os.path.join(workdir, "metrics")
    os.mkdir(mdir, 0o755)
    os.chown(mdir, pwd.getpwnam("hvvss").pw_uid, 0)
    return mdir, os.path.join(mdir, FILENAME)


def written(path: str) -> float:
    return metric(read(path), "hv_vss_agent_write_time_seconds") if os.path.exists(path) else 0


def test_metrics_say_frozen_from_just_before_the_freeze_and_are_refreshed_otherwise(
        workdir, make_fs):
    fs = make_fs("ext4")
    mdir, path = metrics_dir(workdir)
    with running_agent(workdir, [fs.mountpoint], metrics={"dir": mdir, "interval": 1.0},
                       max_frozen=30) as agent:
        assert wait_for(lambda: os.path.exists(path))
        first = written(path)
        # nothing happens, yet the file is rewritten: its age tells a dead agent from an idle one
        assert wait_for(lambda: written(path) > first, 5)
        t0 = time.time()
        assert agent.sim.request("freeze").status == 0
        t1 = time.time()
        probe = assert_blocked(fs.mountpoint, 0.3)
        at_freeze, inode = read(path), os.stat(path).st_ino
        assert metric(at_freeze, "hv_vss_agent_frozen") == 1
        assert t0 - 0.01 <= metric(at_freeze, "hv_vss_agent_write_time_seconds") <= t1 + 0.01
        time.sleep(2.5)  # two intervals and more: never rewritten while frozen
        assert (read(path), os.stat(path).st_ino) == (at_freeze, inode)
        assert agent.sim.request("thaw").status == 0
        assert probe.done_within(5)
        assert wait_for(lambda: metric(read(path), "hv_vss_agent_frozen") == 0)
        assert written(path) >= t1


@pytest.mark.parametrize("frozen", [False, True], ids=["idle", "frozen"])
def test_metrics_say_down_after_sigterm(workdir, make_fs, frozen):
    fs = make_fs("ext4")
    mdir, path = metrics_dir(workdir)
    agent = Agent(workdir, [fs.mountpoint], metrics={"dir": mdir})
    try:
        agent.start()
        assert wait_for(lambda: os.path.exists(path))
        if frozen:
            assert agent.sim.request("freeze").status == 0
            assert metric(read(path), "hv_vss_agent_frozen") == 1
        stopping = time.time()
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.wait_exit(15) == 0
        text = read(path)
        assert (metric(text, "hv_vss_agent_up"), metric(text, "hv_vss_agent_frozen")) == (0, 0)
        assert metric(text, "hv_vss_agent_write_time_seconds") >= stopping - 0.01
        assert metric(text, "hv_vss_agent_freezes_total") == int(frozen)
        assert_writable(fs.mountpoint)
    finally:
        agent.stop()


def test_metrics_after_sigkill_are_stale_then_rewritten_by_the_next_start(workdir, make_fs):
    """A killed agent cannot write: its file keeps up 1, and stops getting younger.
    The next start rewrites it as soon as it serves."""
    fs = make_fs("ext4")
    mdir, path = metrics_dir(workdir)
    agent = Agent(workdir, [fs.mountpoint], metrics={"dir": mdir, "interval": 1.0})
    try:
        agent.start()
        assert wait_for(lambda: os.path.exists(path))
        old = read(path)
        agent.proc.kill()
        agent.wait_exit(5)
        time.sleep(2.5)
        left = read(path)
        assert metric(left, "hv_vss_agent_up") == 1  # nobody was left to say otherwise
        assert time.time() - metric(left, "hv_vss_agent_write_time_seconds") > 2 * 1.0
        launched = time.time()
        agent.launch()
        assert wait_for(lambda: written(path) >= launched)
        new = read(path)
        assert metric(new, "hv_vss_agent_up") == 1
        assert metric(new, "hv_vss_agent_start_time_seconds") > \
            metric(old, "hv_vss_agent_start_time_seconds")
    finally:
        agent.stop()


def test_metrics_are_left_alone_when_the_child_dies_while_frozen(workdir, make_fs):
    """Then the freeze may outlive the child (Linux): the engine writes nothing on its
    way out, and the file goes on saying frozen until the next start has recovered."""
    fs = make_fs("ext4")
    mdir, path = metrics_dir(workdir)
    agent = Agent(workdir, [fs.mountpoint], metrics={"dir": mdir})
    try:
        agent.start()
        assert agent.sim.request("freeze").status == 0
        at_freeze, inode = read(path), os.stat(path).st_ino
        os.kill(agent.child.pid, signal.SIGKILL)
        assert agent.wait_exit(5) == 3
        assert (read(path), os.stat(path).st_ino) == (at_freeze, inode)
        assert metric(at_freeze, "hv_vss_agent_frozen") == 1
        restarted = time.time()
        agent.launch()
        assert_writable(fs.mountpoint)
        assert wait_for(lambda: written(path) >= restarted)
        text = read(path)
        assert (metric(text, "hv_vss_agent_up"), metric(text, "hv_vss_agent_frozen")) == (1, 0)
    finally:
        agent.stop()


def test_metrics_directory_on_a_frozen_filesystem_is_refused(workdir, make_fs):
    fs = make_fs("ext4")
    mdir = os.path.join(fs.mountpoint, "metrics")
    os.mkdir(mdir)
    agent = Agent(workdir, [fs.mountpoint], metrics={"dir": mdir})
    try:
        agent.start(wait=False)
        assert agent.wait_exit(30) == 1
        last = agent.log().strip().splitlines()[-1]
        assert last == (f"hv-vss-agent: [metrics] dir {mdir} is on {fs.mountpoint}, which the "
                        "agent freezes: choose a directory on a filesystem it does not freeze, "
                        "such as one under /run")
    finally:
        agent.stop()


def test_status_lists_what_is_frozen_name_by_name(workdir, make_fs):
    """A comma or a space in a mountpoint is part of its name: the status lists each
    filesystem whole, as the child named it."""
    comma, plain = make_fs("ext4", name="db, logs"), make_fs("ext4")
    with running_agent(workdir, [comma.mountpoint, plain.mountpoint]) as agent:
        assert agent.sim.request("freeze").status == 0
        try:
            assert wait_for(lambda: status_json(agent)["state"] == "frozen")
            st = status_json(agent)
            text = cli("status", "--socket", agent.control_socket).stdout
        finally:
            assert agent.sim.request("thaw").status == 0
    assert sorted(st["frozen_mounts"]) == sorted([comma.mountpoint, plain.mountpoint])
    assert st["frozen_count"] == 2
    line = next(x for x in text.splitlines() if x.startswith("state: FROZEN"))
    assert line.endswith((f"{comma.mountpoint}, {plain.mountpoint}",
                          f"{plain.mountpoint}, {comma.mountpoint}")), line


def test_status_says_how_many_more_are_frozen_than_it_names():
    base = {"state": "frozen", "time": 10.0, "frozen_since": 9.0, "frozen_count": 5}
    assert "): /a, /b and 3 more" in render_text({**base, "frozen_mounts": ["/a", "/b"]}, {})
    assert "): 5 filesystem(s)" in render_text({**base, "frozen_mounts": []}, {})
    assert "): /a, /b\n" in render_text({**base, "frozen_mounts": ["/a", "/b"],
                                        "frozen_count": 2}, {})


@pytest.mark.parametrize("answer", [
    {},
    {"state": "frozen", "frozen_mounts": 5, "frozen_since": "yesterday", "agent": [],
     "transactions": [1, {"seconds": "x", "subscribers": [None]}], "events": {"a": 1}},
    {"state": "frozen", "frozen_mounts": ["/srv\x1b[2J"], "time": 1e300, "frozen_since": -1e300,
     "counters": {"evil\x1b]0;owned\x07": "\x1b[31mred"},
     "frontend": {"subscribers": [{"name": "x\r\nFAKE: line"}]}},
])
def test_status_text_survives_any_answer_and_prints_no_control_characters(answer):
    """The answer comes through the frontend, which faces untrusted clients."""
    text = render_text(answer, {"engine": {"error": "pid 1: not allowed to look"},
                                "frontend": {"pid": 2, "rss": "lots"}})
    assert not any(c in text for c in "\x1b\x07\r")
    assert "FAKE: line" not in text.splitlines()[0]


# --- watching a freeze as it happens ----------------------------------------------------------

FROZEN_FOR = re.compile(r"state: FROZEN for (\d+\.\d) s")
LEFT = re.compile(r"watchdog: thaws them in (\d+\.\d) s at the latest")


def test_status_counts_the_frozen_time_and_the_watchdogs_time_left_live(workdir, make_fs):
    """Nothing changes while frozen, so the engine builds no new snapshot: the answer must
    still say how long it has been frozen now, and how long the watchdog leaves."""
    fs = make_fs("ext4")
    with running_agent(workdir, [fs.mountpoint], max_frozen=30) as agent:
        t0 = time.monotonic()
        assert agent.sim.request("freeze").status == 0
        t1 = time.monotonic()
        probe = assert_blocked(fs.mountpoint, 0.3)
        seen = []
        for _ in range(2):
            time.sleep(1.0)
            t2, w2 = time.monotonic(), time.time()
            st = status_json(agent)
            text = cli("status", "--socket", agent.control_socket).stdout
            t3, w3 = time.monotonic(), time.time()
            seen.append((t2, t3, w2, w3, st, text))
        assert agent.sim.request("thaw").status == 0
        assert probe.done_within(5)
        thawed = status_json(agent)

    for t2, t3, w2, w3, st, text in seen:
        # The agent's freeze began after t0 and had succeeded by t1; it answered in [t2, t3].
        assert st["state"] == "frozen"
        assert t2 - t1 <= st["frozen_seconds"] <= t3 - t0, (t0, t1, t2, t3, st)
        assert 30 - (t3 - t0) <= st["watchdog"]["seconds_left"] <= 30 - (t2 - t1)
        assert st["watchdog"]["max_frozen_seconds"] == 30
        assert w2 - 0.01 <= st["time"] <= w3 + 0.01  # the answer's time, not the snapshot's
        frozen_for = float(FROZEN_FOR.search(text).group(1))
        left = float(LEFT.search(text).group(1))
        assert t2 - t1 - 0.05 <= frozen_for <= t3 - t0 + 0.05 + (t3 - t2), text
        assert 30 - (t3 - t0) - 0.05 - (t3 - t2) <= left <= 30 - (t2 - t1) + 0.05, text
    assert seen[1][4]["frozen_seconds"] > seen[0][4]["frozen_seconds"] + 0.5
    assert thawed["frozen_seconds"] is None and thawed["watchdog"]["seconds_left"] is None
    assert thawed["agent"]["version"] == agent_version()


class Lines:
    """A child's stdout, line by line, with timeouts."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.proc = proc
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.queue.put(line)
        self.queue.put(None)

    def until(self, predicate, timeout: float = 10.0) -> list[str]:
        """Lines up to and including the first that satisfies `predicate`."""
        got, deadline = [], time.monotonic() + timeout
        while True:
            line = self.queue.get(timeout=max(0.01, deadline - time.monotonic()))
            assert line is not None, f"the watcher exited: {got}"
            got.append(line)
            if predicate(line):
                return got


# Ctrl-C is what stops a watch: SIGINT handled as Python does by default, whatever the
# test runner inherited (a job started with `&` by a non-interactive shell ignores it).
WATCH = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
         "from agent.cli import main; sys.exit(main(sys.argv[1:]))")


def watcher(*args: str) -> subprocess.Popen:
    return subprocess.Popen([PY, "-c", WATCH, "status", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_status_watch_follows_a_freeze_the_thaw_and_the_agent_stopping(workdir, make_fs):
    fs = make_fs("ext4")
    agent = Agent(workdir, [fs.mountpoint], max_frozen=30)
    agent.start()
    as_json = watcher("--watch", "0.2", "--json", "--socket", agent.control_socket)
    as_text = watcher("--watch", "0.2", "--socket", agent.control_socket)
    try:
        js, tx = Lines(as_json), Lines(as_text)
        js.until(lambda line: json.loads(line).get("state") == "thawed")
        tx.until(lambda line: line.startswith("state: thawed"))
        assert agent.sim.request("freeze").status == 0
        frozen = [json.loads(line) for line in
                  js.until(lambda line: json.loads(line).get("state") == "frozen")]
        more = [json.loads(js.until(lambda _: True)[0]) for _ in range(3)]
        counted = [frozen[-1]["frozen_seconds"]] + [m["frozen_seconds"] for m in more]
        assert counted == sorted(counted) and counted[-1] > counted[0], counted
        texts = [FROZEN_FOR.search(tx.until(lambda line: bool(FROZEN_FOR.search(line)))[-1])
                 for _ in range(4)]
        assert float(texts[-1].group(1)) > float(texts[0].group(1))
        assert agent.sim.request("thaw").status == 0
        js.until(lambda line: json.loads(line).get("state") == "thawed")
        tx.until(lambda line: line.startswith("state: thawed"))
        agent.stop()  # the watch goes on, and says so
        js.until(lambda line: json.loads(line).get("error", "").startswith("not running: "))
        tx.until(lambda line: line.startswith("hv-vss-agent status: not running: "))
        for proc in (as_json, as_text):
            proc.send_signal(signal.SIGINT)
            assert proc.wait(10) == 0
            assert proc.stderr.read() == ""
    finally:
        for proc in (as_json, as_text):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        agent.stop()


def test_status_says_not_running_without_an_agent(workdir):
    missing = os.path.join(workdir, "control.sock")
    r = cli("status", "--socket", missing)
    assert r.returncode == 3 and r.stdout == ""
    assert r.stderr == (f"hv-vss-agent status: not running: no control socket at {missing} "
                        "(an agent makes it only with [control] socket set)\n")
    # A socket file with nobody listening: what an agent killed by SIGKILL leaves behind.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(missing)
    s.close()
    r = cli("status", "--json", "--socket", missing)
    assert r.returncode == 3 and r.stdout == ""
    assert r.stderr == (f"hv-vss-agent status: not running: nothing listens on {missing}, a "
                        "socket left by an agent that has stopped\n")


def test_status_into_a_closed_pipe_ends_quietly(workdir, make_fs):
    fs = make_fs("ext4")
    with running_agent(workdir, [fs.mountpoint]) as agent:
        for args in ((), ("--json",), ("--watch", "0.1")):
            r, w = os.pipe()
            os.close(r)  # the reader is gone before the first byte: EPIPE, deterministically
            try:
                done = subprocess.run([PY, "-m", "agent", "status", *args, "--socket",
                                       agent.control_socket], cwd=REPO, stdout=w,
                                      stderr=subprocess.PIPE, text=True, timeout=30,
                                      check=False)
            finally:
                os.close(w)
            assert (done.returncode, done.stderr) == (141, ""), (args, done)
        # and the way people meet it
        r2 = subprocess.run(["sh", "-c", f"{PY} -m agent status --json --socket "
                             f"{agent.control_socket} | head -1"], cwd=REPO,
                            capture_output=True, text=True, timeout=30, check=False)
        assert r2.stdout == "{\n" and r2.stderr == ""


def agent_version() -> str:
    return importlib.metadata.version("hv-vss-agent")
