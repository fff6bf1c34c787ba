"""Subscribers, for real: the agent's frontend, real peers under other uids, real freezes.

Every test freezes only the scratch filesystems it made.  Subscribers are separate
processes started with the uid, gid and supplementary groups each case needs, so the
kernel's peer credentials are the real thing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading

import pytest

from agent.clients.notify import AgentGone, Subscription, Veto
from agent.kernel import linux_wire as lw
from tests.helpers import (
    Subscriber,
    assert_blocked,
    assert_writable,
    running_agent,
    wait_for,
)

NOBODY = 65534
DAEMON = 1  # user and group "daemon" (Debian base)


def test_allowed_and_refused_peers(workdir, make_fs):
    fs = make_fs("ext4")
    notify = {"allow_users": ["nobody"], "allow_groups": ["adm"]}
    with running_agent(workdir, [fs.mountpoint], notify=notify) as agent:
        subs = {
            "nobody": Subscriber(agent.notify_socket, workdir, name="nobody", user=NOBODY,
                                 group=NOBODY),
            "adm": Subscriber(agent.notify_socket, workdir, name="adm", user=DAEMON,
                              group=DAEMON, extra_groups=["adm"]),
            "root": Subscriber(agent.notify_socket, workdir, name="root"),
            "daemon": Subscriber(agent.notify_socket, workdir, name="daemon", user=DAEMON,
                                 group=DAEMON, extra_groups=[]),
        }
        try:
            for name in ("nobody", "adm", "root"):
                assert "welcome WELCOME" in subs[name].wait_welcome(), name
            # The kernel refused the other one's connect() (the socket's ACL): it heard nothing.
            assert subs["daemon"].proc.wait(10) != 0
            assert subs["daemon"].lines() == []
            # The allowed ones hear the events; the refused one is gone.
            assert agent.sim.request("freeze").status == 0
            assert agent.sim.request("thaw").status == 0
            for name in ("nobody", "adm", "root"):
                assert wait_for(lambda n=name: subs[n].events() == ["FREEZE", "THAW"]), name
            assert subs["daemon"].proc.wait(5) is not None
        finally:
            for s in subs.values():
                s.stop()


def test_check_veto_reaches_the_host_and_the_log(workdir, make_fs):
    fs = make_fs("ext4")
    with running_agent(workdir, [fs.mountpoint]) as agent:
        sub = Subscriber(agent.notify_socket, workdir, name="vetoer", rules="CHECK=veto")
        try:
            sub.wait_welcome()
            check = agent.sim.request("check")
            assert check.status == lw.HV_E_FAIL
            assert wait_for(lambda: "CHECK vetoed by subscriber vetoer" in agent.log())
            assert "backup window closed" in agent.log()
        finally:
            sub.stop()
        # Without the vetoer, the same CHECK passes.
        assert wait_for(lambda: "subscriber vetoer" in agent.log() and "disconnected"
                        in agent.log())
        assert agent.sim.request("check").status == 0


BAD = {
    "slow": ("FREEZE=slow:5", "timeout"),
    "dead": ("FREEZE=die", "disconnected"),
    "garbage": ("FREEZE=garbage", "garbage"),
    "oversized": ("FREEZE=oversized", "garbage"),
    "failing": ("FREEZE=fail", "failed"),
}


@pytest.mark.parametrize("policy", ["fail", "skip"])
@pytest.mark.parametrize("behaviour", sorted(BAD))
def test_bad_subscribers_follow_the_policy(workdir, make_fs, behaviour, policy):
    fs = make_fs("ext4")
    rules, outcome = BAD[behaviour]
    notify = {"policy": policy, "timeout": 1.0}
    with running_agent(workdir, [fs.mountpoint], notify=notify) as agent:
        good = Subscriber(agent.notify_socket, workdir, name="good")
        bad = Subscriber(agent.notify_socket, workdir, name="bad", rules=rules)
        try:
            good.wait_welcome()
            bad.wait_welcome()
            freeze = agent.sim.request("freeze")
            if policy == "fail":
                assert freeze.status == lw.HV_E_FAIL
                assert_writable(fs.mountpoint, 2)  # never frozen
                assert wait_for(lambda: f"subscriber bad (uid 0, pid {bad.proc.pid}): {outcome} "
                                "on FREEZE" in agent.log())
                assert "failing it ([notify] policy = fail)" in agent.log()
                # the good one, which had quiesced, is told to resume
                assert wait_for(lambda: good.events() == ["FREEZE", "THAW"])
            else:
                assert freeze.status == 0
                probe = assert_blocked(fs.mountpoint, 0.3)
                assert agent.sim.request("thaw").status == 0
                assert probe.done_within(5)
                # logged while frozen, so held until the thaw
                assert wait_for(lambda: f"subscriber bad (uid 0, pid {bad.proc.pid}): {outcome} "
                                "on FREEZE" in agent.log())
                assert "going on without it ([notify] policy = skip)" in agent.log()
        finally:
            good.stop()
            bad.stop()


def test_the_engine_keeps_its_own_deadline(workdir, make_fs):
    """Even a frontend that never answers cannot hold the FREEZE past [notify] budget."""
    fs = make_fs("ext4")
    with running_agent(workdir, [fs.mountpoint], notify={"budget": 1.0}) as agent:
        sub = Subscriber(agent.notify_socket, workdir, name="waiting")
        try:
            sub.wait_welcome()  # someone to tell: the engine asks the frontend
            frontend = agent.frontend
            os.kill(frontend.pid, signal.SIGSTOP)
            try:
                freeze = agent.sim.request("freeze", timeout=20)
            finally:
                os.kill(frontend.pid, signal.SIGCONT)
            assert freeze.status == lw.HV_E_FAIL
            assert_writable(fs.mountpoint, 2)
            assert wait_for(lambda: "the agent's own deadline ([notify] budget = 1.0 s"
                            in agent.log())
            # and once the frontend runs again, everything works
            assert agent.sim.request("freeze").status == 0
            assert agent.sim.request("thaw").status == 0
        finally:
            sub.stop()


def test_with_no_subscriber_to_tell_the_frontend_is_not_waited_for(workdir, make_fs):
    """The frontend says how many subscribers would hear an event; while that is none,
    CHECK, FREEZE and THAW go on without a round trip to it, so even a stopped frontend
    holds nothing up.  Once one has been welcomed, it is asked again."""
    fs = make_fs("ext4")
    with running_agent(workdir, [fs.mountpoint], notify={"budget": 1.0}) as agent:
        # Answered, this CHECK shows the frontend serving: it says how many would hear an
        # event (none) before it handles anything, so the engine knows it from here on.
        assert agent.sim.request("check").status == lw.HV_S_OK
        frontend = agent.frontend
        os.kill(frontend.pid, signal.SIGSTOP)
        try:
            for request in ("check", "freeze", "thaw"):
                assert agent.sim.request(request, timeout=20).status == lw.HV_S_OK, request
        finally:
            os.kill(frontend.pid, signal.SIGCONT)
        sub = Subscriber(agent.notify_socket, workdir, name="late")
        try:
            sub.wait_welcome()
            assert agent.sim.request("freeze").status == lw.HV_S_OK
            assert agent.sim.request("thaw").status == lw.HV_S_OK
            assert wait_for(lambda: sub.events() == ["FREEZE", "THAW"])
        finally:
            sub.stop()
        assert "the agent's own deadline" not in agent.log()


def test_frontend_log_records_are_held_while_frozen(workdir, make_fs):
    fs = make_fs("ext4")
    with running_agent(workdir, [fs.mountpoint], notify={"allow_users": ["daemon"]}) as agent:
        assert agent.sim.request("freeze").status == 0
        late = Subscriber(agent.notify_socket, workdir, name="late", user=DAEMON,
                          group=DAEMON, extra_groups=[])
        assert "welcome WELCOME" in late.wait_welcome()
        # The frontend logged the new subscriber; the engine's gate holds it until THAW.
        assert not wait_for(lambda: "subscriber late connected" in agent.log(), 1.0)
        assert agent.sim.request("thaw").status == 0
        assert wait_for(lambda: "subscriber late connected" in agent.log())
        late.stop()


def test_frontend_is_unprivileged_and_holds_only_its_sockets(workdir, make_fs):
    fs = make_fs("ext4")
    with running_agent(workdir, [fs.mountpoint]) as agent:
        frontend, parent = agent.frontend, agent.parent
        assert all(u != 0 for u in frontend.uids())
        assert os.readlink(f"/proc/{frontend.pid}/root") == os.path.join(workdir, "empty")
        with open(f"/proc/{frontend.pid}/status", encoding="ascii") as f:
            assert "NoNewPrivs:\t1" in f.read()
        # Its sockets are the engine link and the two listeners; the rest is stdio and
        # the logging queue's pipe.  Nothing of the child's link or the kernel device.
        fds = {int(n): os.readlink(f"/proc/{frontend.pid}/fd/{n}")
               for n in os.listdir(f"/proc/{frontend.pid}/fd")}
        sockets = {t for t in fds.values() if t.startswith("socket:")}
        parent_fds = {os.readlink(f"/proc/{parent.pid}/fd/{n}")
                      for n in os.listdir(f"/proc/{parent.pid}/fd")}
        child_link = {t for t in parent_fds if t.startswith("socket:")} - sockets
        assert len(sockets) == 3, fds
        assert child_link, "the parent's own sockets (child, kernel) are not the frontend's"
        assert sum(t.startswith("pipe:") for t in fds.values()) <= 2, fds


def test_frontend_exits_when_the_engine_is_killed(workdir, make_fs):
    fs = make_fs("ext4")
    with running_agent(workdir, [fs.mountpoint]) as agent:
        frontend = agent.frontend
        os.kill(agent.parent.pid, signal.SIGKILL)
        assert wait_for(lambda: not frontend.is_running() or frontend.status() == "zombie", 10)


def test_subscriber_protocol_errors_do_not_disturb_others(workdir, make_fs):
    fs = make_fs("ext4")
    with running_agent(workdir, [fs.mountpoint]) as agent:
        good = Subscriber(agent.notify_socket, workdir, name="good")
        try:
            good.wait_welcome()
            for junk in (b"HELLO 2 future\n", b"OK FREEZE 99\n", b"\xff\xfe\n", b"x" * 600):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(agent.notify_socket)
                s.settimeout(5)
                assert s.recv(64).startswith(b"HVVSS 1")
                s.sendall(junk)
                answer = s.recv(512)
                assert answer.startswith(b"ERROR "), (junk, answer)
                assert s.recv(64) == b""  # and it is disconnected
                s.close()
            assert agent.sim.request("freeze").status == 0
            assert agent.sim.request("thaw").status == 0
            assert wait_for(lambda: good.events() == ["FREEZE", "THAW"])
            assert agent.log().count("broke the protocol") == 4
        finally:
            good.stop()


def test_python_api_subscriber_vetoes_and_fails(workdir, make_fs):
    """agent.clients.notify: handlers that return answer OK, Veto vetoes, anything else fails."""
    fs = make_fs("ext4")
    seen: list[tuple[str, int]] = []

    def on_check(notice):
        seen.append(("check", notice.ms))
        if len(seen) == 1:
            raise Veto("nightly batch running")

    def on_freeze(notice):
        seen.append(("freeze", notice.ms))
        raise OSError("flush failed")

    with running_agent(workdir, [fs.mountpoint], notify={"timeout": 3.0}) as agent:
        sub = Subscription(agent.notify_socket, "api-app", timeout=2.0)
        thread = threading.Thread(target=lambda: _serve(sub, on_check, on_freeze), daemon=True)
        thread.start()
        assert agent.sim.request("check").status == lw.HV_E_FAIL
        assert agent.sim.request("check").status == 0
        assert agent.sim.request("freeze").status == lw.HV_E_FAIL
        assert wait_for(lambda: "CHECK vetoed by subscriber api-app" in agent.log())
        assert wait_for(lambda: "failed on FREEZE (OSError: flush failed)" in agent.log())
        assert [event for event, _ in seen] == ["check", "check", "freeze"]
        assert all(0 < ms <= 2000 for _, ms in seen)  # the deadline it asked for in HELLO
    thread.join(10)
    assert not thread.is_alive(), "serve() did not return when the agent went away"


def _serve(sub, on_check, on_freeze):
    with contextlib.suppress(AgentGone), sub:
        sub.serve(on_check=on_check, on_freeze=on_freeze)
