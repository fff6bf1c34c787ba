"""Operator visibility: `status` / `status --json` over the control socket, and metrics."""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import subprocess
import time

import pytest

from agent.kernel import linux_wire as lw
from agent.metrics import FILENAME
from agent.status import render_text
from tests.helpers import (
    USER_PY,
    Agent,
    Subscriber,
    assert_blocked,
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
        assert "state: FROZEN since" in text_frozen and fs.mountpoint in text_frozen

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
