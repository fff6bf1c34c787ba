"""`hook`'s machinery in this process: its processes (agent/clients/hook_process.py) and its
reading of the agent (agent/clients/hook.py), where no backup run shows them reliably.

The end-to-end behaviour (the real agent, an unprivileged client) is in test_hook.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from agent.clients.hook import HookClient
from agent.clients.hook_process import Supervisor
from agent.clients.notify import Subscription


@pytest.fixture
def sup() -> Iterator[Supervisor]:
    s = Supervisor()
    try:
        yield s
    finally:
        s.close()


def script(workdir: str, text: str) -> str:
    path = os.path.join(workdir, "hook")
    with open(path, "w", encoding="utf-8") as f:
        f.write("#!/bin/sh\n" + text)
    os.chmod(path, 0o755)
    return path


def wait_until(sup: Supervisor, done: object, seconds: float = 10) -> bool:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        if done():  # type: ignore[operator]
            return True
        sup.wait(min(until, time.monotonic() + 0.1))
    return False


def test_a_hook_stays_unreaped_while_its_group_lives_so_its_id_stays_ours(workdir, sup):
    mark = os.path.join(workdir, "background.pid")
    group = sup.start(script(workdir, f"sleep 60 &\necho $! > {mark}\n"), "freeze")
    assert wait_until(sup, group.exited)
    assert group.status == 0
    background = psutil.Process(int(open(mark, encoding="ascii").read()))
    assert os.getpgid(background.pid) == group.pgid

    sup.tidy()
    # the hook is a zombie, not reaped: no other process can be given its id, which is
    # the group's, so killing the group later cannot reach a stranger
    assert psutil.Process(group.pgid).status() == psutil.STATUS_ZOMBIE
    assert group in sup.groups

    background.kill()
    background.wait(5)
    assert wait_until(sup, lambda: (sup.tidy(), group not in sup.groups)[1])
    assert not psutil.pid_exists(group.pgid) or \
        psutil.Process(group.pgid).status() != psutil.STATUS_ZOMBIE  # reaped now


def test_output_written_after_the_hook_returned_is_read_so_the_writer_never_blocks(
        workdir, sup, caplog):
    caplog.set_level(logging.INFO, logger="hv-vss-agent.hook")
    done = os.path.join(workdir, "done")
    # far more than a pipe holds (64 KiB), written once the hook itself has gone
    group = sup.start(script(workdir, "(sleep 0.2; head -c 1000000 /dev/zero | tr '\\0' x; "
                                      f"echo; echo all written; touch {done}) &\n"), "freeze")
    assert wait_until(sup, group.exited)
    assert wait_until(sup, lambda: os.path.exists(done)), "the background writer is blocked"
    assert wait_until(sup, lambda: "hook freeze: all written" in caplog.text)


def test_an_event_that_comes_with_the_welcome_is_not_left_in_the_buffer(workdir, sup):
    """The agent logs the subscriber and may send FREEZE right after WELCOME: both can
    arrive in one read during the handshake, and then select() never reports the FREEZE."""
    marker = os.path.join(workdir, "marker")
    hook = script(workdir, f'echo "$1" >> {marker}\n')
    path = os.path.join(workdir, "agent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    answers: list[bytes] = []

    def agent() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            conn.sendall(b"HVVSS 1\n")
            f = conn.makefile("rb")
            assert f.readline().startswith(b"HELLO 1 ")
            conn.sendall(b"WELCOME 1\nFREEZE 7 5000\n")  # one write, one read
            with contextlib.suppress(TimeoutError):
                answers.append(f.readline())

    fake = threading.Thread(target=agent)
    fake.start()
    try:
        sub = Subscription(path, "t")
        with sub:
            HookClient(hook, None, sup).serve(sub)  # until the fake agent hangs up
    finally:
        fake.join(15)
        listener.close()
    assert answers == [b"OK FREEZE 7\n"]
    # and as the agent went away after FREEZE, the hook was thawed
    assert open(marker, encoding="ascii").read().split() == ["freeze", "thaw"]
