"""The cooldown bounds what even a fully compromised parent can do.

Claim (SECURITY.md): whatever the parent sends, filesystems stay frozen at
most max_frozen_seconds out of every max_frozen_seconds + cooldown_seconds.
The parent here is the test itself, holding the real child's socket and
asking for FREEZE as fast as the child answers; a writer process on the
real scratch filesystem measures how long its writes really stalled.
"""

from __future__ import annotations

import errno
import itertools
import os
import time

from agent.child_link import ChildLink
from agent.demo import Writer
from privileged import wire
from privileged.config import ChildConfig, WatchdogConfig
from privileged.statefile import StateDir
from tests.helpers import assert_writable, write_config

MAX_FROZEN, COOLDOWN = 0.5, 1.5
SLACK = 1.0  # scheduling on a loaded 2-core machine; bounds below are "at most", never "fast"


def spawn(workdir: str, mount: str, cooldown: float = COOLDOWN) -> ChildLink:
    cfg = write_config(os.path.join(workdir, "child.toml"), [mount], workdir,
                       max_frozen=MAX_FROZEN, cooldown=cooldown)
    link = ChildLink.spawn(cfg, None)
    link.wait_hello()
    return link


def stalls(times: list[float], longer_than: float) -> list[tuple[float, float]]:
    return [(a, b) for a, b in itertools.pairwise(times) if b - a > longer_than]


def test_freeze_flood_from_a_compromised_parent_is_bounded(workdir, make_fs):
    fs = make_fs("ext4")
    writer = Writer(os.path.join(fs.mountpoint, "writer.dat")).start()
    link = spawn(workdir, fs.mountpoint)
    freezes: list[tuple[float, float]] = []  # (sent, answered OK)
    refused = 0
    try:
        end = time.monotonic() + 3 * (MAX_FROZEN + COOLDOWN)
        while time.monotonic() < end:
            sent = time.monotonic()
            res, _ = link.request(wire.Op.FREEZE, timeout=10)
            if res.status is wire.Status.REFUSED:
                assert res.errno == errno.EAGAIN
                refused += 1
                continue
            assert res.status is wire.Status.OK
            freezes.append((sent, time.monotonic()))
            # never THAW: wait for the watchdog, then resync as a parent must
            msg, _ = link.receive()
            while not isinstance(msg, wire.Event):
                msg, _ = link.receive()
            assert link.request(wire.Op.THAW, timeout=10)[0].status is wire.Status.OK
        link.request(wire.Op.QUIT)
    finally:
        link.close()
        link.exit_status(10)
        time.sleep(0.1)
        writer.stop()
    assert len(freezes) >= 2 and refused > 0
    for (sent, _), (_, next_ok) in itertools.pairwise(freezes):
        # the next freeze began only after this one's max_frozen and a whole cooldown
        assert next_ok - sent >= MAX_FROZEN + COOLDOWN
    real = stalls(writer.done, MAX_FROZEN / 2)
    assert real, "the writer never stalled: nothing was frozen"
    assert max(b - a for a, b in real) <= MAX_FROZEN + SLACK
    assert_writable(fs.mountpoint)


def test_cooldown_survives_a_restart_of_the_child(workdir, make_fs):
    """A parent cannot skip the cooldown by ending its child (garbage) to get a fresh one.

    The cooldown (60 s) outlasts the longest the second child may take to start
    (ChildLink.wait_hello gives up after 20 s), so its FREEZE falls inside it."""
    fs = make_fs("ext4")
    first = spawn(workdir, fs.mountpoint, cooldown=60)
    assert first.request(wire.Op.FREEZE)[0].status is wire.Status.OK
    first.sock.send(b"garbage")  # violation: the child thaws and exits
    assert first.exit_status(10) == 2
    assert_writable(fs.mountpoint)

    second = spawn(workdir, fs.mountpoint, cooldown=60)
    res, _ = second.request(wire.Op.FREEZE)
    assert (res.status, res.errno) == (wire.Status.REFUSED, errno.EAGAIN)
    assert second.request(wire.Op.CHECK)[0].status is wire.Status.OK  # only FREEZE waits
    second.request(wire.Op.QUIT)
    assert second.exit_status(10) == 0
    assert_writable(fs.mountpoint)


def test_a_recorded_cooldown_never_lasts_longer_than_one_cooldown(workdir):
    from privileged.child import inherited_cooldown

    state = StateDir(os.path.join(workdir, "state"))
    state.ensure()
    cfg = ChildConfig(watchdog=WatchdogConfig(cooldown_seconds=5.0))
    assert inherited_cooldown(state, cfg, recovered=0) == 0.0  # no record: no cooldown
    state.write_cooldown(time.monotonic() + 3600)  # from an earlier boot, or tampered with
    assert inherited_cooldown(state, cfg, recovered=0) <= time.monotonic() + 5.0
    state.write_cooldown(float("nan"))
    assert inherited_cooldown(state, cfg, recovered=0) == 0.0
    now = time.monotonic()
    assert inherited_cooldown(state, cfg, recovered=1) >= now + 5.0  # a crash record thawed
