"""The frozen-time budget bounds what even a fully compromised parent can do.

Claim (SECURITY.md): whatever the parent sends, filesystems stay frozen at
most max_frozen_seconds at a time, and in any span of T seconds at most
budget_seconds + budget_seconds_per_hour * T / 3600; backups back to back
with the shipped config are never refused.  The parent here is the test
itself, holding the real child's socket and asking for FREEZE as fast as the
child answers; a writer process on the real scratch filesystem measures how
long its writes really stalled.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import signal
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dev.demo import Writer
from agent.engine.child_link import ChildLink
from agent.kernel import linux_wire as lw
from privileged import wire
from privileged.budget import Bucket
from tests.helpers import REPO, Agent, assert_blocked, assert_writable, write_config

MAX_FROZEN, BUDGET, PER_HOUR = 0.5, 1.0, 360.0  # refills 0.1 s every second
SLACK = 0.5  # per freeze: the watchdog's tick and a loaded machine; an upper bound, never speed


def spawn(workdir: str, mount: str, per_hour: float = PER_HOUR) -> ChildLink:
    cfg = write_config(os.path.join(workdir, "child.toml"), [mount], workdir,
                       max_frozen=MAX_FROZEN, budget=BUDGET, budget_per_hour=per_hour)
    link = ChildLink.spawn(cfg, None)
    link.wait_hello()
    return link


def stalls(times: list[float], longer_than: float) -> list[tuple[float, float]]:
    return [(a, b) for a, b in itertools.pairwise(times) if b - a > longer_than]


def freeze_until_the_watchdog(link: ChildLink) -> wire.Result:
    """FREEZE and never THAW: the watchdog thaws, then resync as a parent must."""
    res, _ = link.request(wire.Op.FREEZE, timeout=10)
    if res.status is wire.Status.OK:
        msg, _ = link.receive()
        while not isinstance(msg, wire.Event):
            msg, _ = link.receive()
        assert link.request(wire.Op.THAW, timeout=10)[0].status is wire.Status.OK
    return res


def test_freeze_flood_from_a_compromised_parent_is_bounded(workdir, make_fs):
    fs = make_fs("ext4")
    writer = Writer(os.path.join(fs.mountpoint, "writer.dat")).start()
    link = spawn(workdir, fs.mountpoint)
    granted = refused = 0
    start = time.monotonic()
    try:
        while time.monotonic() < start + 6.0:
            res = freeze_until_the_watchdog(link)
            if res.status is wire.Status.REFUSED:
                assert res.errno == errno.EAGAIN
                refused += 1
            else:
                assert res.status is wire.Status.OK
                granted += 1
        end = time.monotonic()
        link.request(wire.Op.QUIT)
    finally:
        link.close()
        link.exit_status(10)
        time.sleep(0.1)
        writer.stop()
    real = stalls(writer.done, 0.1)
    assert real, "the writer never stalled: nothing was frozen"
    assert max(b - a for a, b in real) <= MAX_FROZEN + SLACK
    # in the whole span, no more than the bucket held plus what it refilled
    frozen = sum(b - a for a, b in real if a >= start - 0.01)
    allowed = BUDGET + PER_HOUR / 3600 * (end - start)
    assert granted <= allowed / MAX_FROZEN + 1 and refused > 0
    assert frozen <= allowed + 0.05 * granted, (frozen, allowed, granted)
    assert_writable(fs.mountpoint)


def test_budget_survives_a_restart_of_the_child(workdir, make_fs):
    """A parent cannot refill the budget by ending its child (garbage) to get a fresh one,
    nor by having it killed while frozen: the next child starts from what was spent."""
    fs = make_fs("ext4")
    first = spawn(workdir, fs.mountpoint, per_hour=0)  # never refills
    assert freeze_until_the_watchdog(first).status is wire.Status.OK  # half the budget
    assert first.request(wire.Op.FREEZE)[0].status is wire.Status.OK  # the other half
    os.kill(first.pid, signal.SIGKILL)  # killed while frozen: the crash record remains
    assert first.exit_status(10) == -signal.SIGKILL

    second = spawn(workdir, fs.mountpoint, per_hour=0)
    assert second.hello is not None and second.hello.recovered == 1
    assert_writable(fs.mountpoint)  # the crash record was honoured
    res, _ = second.request(wire.Op.FREEZE)
    assert (res.status, res.errno) == (wire.Status.REFUSED, errno.EAGAIN)
    assert second.request(wire.Op.CHECK)[0].status is wire.Status.OK  # only FREEZE waits
    second.sock.send(b"garbage")
    assert second.exit_status(10) == 2

    third = spawn(workdir, fs.mountpoint, per_hour=0)
    assert third.request(wire.Op.FREEZE)[0].status is wire.Status.REFUSED
    third.request(wire.Op.QUIT)
    assert third.exit_status(10) == 0
    assert_writable(fs.mountpoint)


def shipped_watchdog() -> str:
    """The [watchdog] section of etc/hv-vss-agent.toml, as shipped."""
    with open(os.path.join(REPO, "etc", "hv-vss-agent.toml"), encoding="utf-8") as f:
        text = f.read()
    section = re.search(r"^\[watchdog\].*?(?=^\[)", text, re.MULTILINE | re.DOTALL)
    assert section is not None
    return section.group(0)


def test_back_to_back_backups_with_the_shipped_config_are_never_refused(workdir, make_fs):
    fs = make_fs("ext4")
    agent = Agent(workdir, [fs.mountpoint], frontend=False)
    with open(agent.config, encoding="utf-8") as f:
        text = f.read()
    # the shipped [watchdog] section in place of the test's own
    text = re.sub(r"^\[watchdog\]\n(?:[^\[].*\n|\n)*", lambda _: shipped_watchdog(), text,
                  flags=re.MULTILINE)
    assert "max_frozen_seconds = 60" in text
    with open(agent.config, "w", encoding="utf-8") as f:
        f.write(text)
    try:
        agent.start()
        for cycle in range(20):
            for op in ("check", "freeze", "thaw"):
                assert agent.sim.request(op).status == lw.HV_S_OK, (cycle, op, agent.log())
        assert_writable(fs.mountpoint)
    finally:
        agent.stop()


def test_a_freeze_is_refused_when_the_budget_holds_less_than_a_window(workdir, make_fs):
    fs = make_fs("ext4")
    link = spawn(workdir, fs.mountpoint, per_hour=0)
    assert link.request(wire.Op.FREEZE)[0].status is wire.Status.OK
    probe = assert_blocked(fs.mountpoint, 0.2)
    assert link.request(wire.Op.THAW)[0].status is wire.Status.OK  # refunds the unused part
    assert probe.done_within(5)
    assert link.request(wire.Op.FREEZE)[0].status is wire.Status.OK  # so a second one fits
    assert link.request(wire.Op.THAW)[0].status is wire.Status.OK
    assert freeze_until_the_watchdog(link).status is wire.Status.OK  # spends a whole window
    res, _ = link.request(wire.Op.FREEZE)
    assert (res.status, res.errno) == (wire.Status.REFUSED, errno.EAGAIN)
    assert_writable(fs.mountpoint)
    link.request(wire.Op.QUIT)


# --- the arithmetic, for any sequence of freezes --------------------------------------------

FREEZES = st.lists(st.tuples(st.floats(0, 30), st.floats(0, 1)), max_size=40)


@settings(max_examples=500, deadline=None)
@given(FREEZES, st.floats(0.1, 10), st.floats(0, 3600))
def test_no_span_holds_more_frozen_time_than_the_bound(freezes, window, per_hour):
    """Charged a whole window before, given back the unused part after, as the child does:
    in any span of T seconds, at most capacity + rate * T is frozen."""
    capacity = 2 * window
    bucket = Bucket(capacity, per_hour / 3600, capacity, 0.0)
    now, frozen = 0.0, []
    for gap, share in freezes:
        now += gap
        if bucket.take(window, now):
            used = window * share  # thawed early by THAW, or at the deadline
            frozen.append((now, now + used))
            now += used
            bucket.give_back(window - used, now)
        assert 0.0 <= bucket.left <= capacity + 1e-9
    for a, _ in frozen:
        for _, b in frozen:
            if b > a:
                inside = sum(min(e, b) - max(s, a) for s, e in frozen if e > a and s < b)
                assert inside <= capacity + per_hour / 3600 * (b - a) + 1e-6


def test_the_wait_a_refusal_names_is_what_the_bucket_lacks_at_its_refill_rate():
    bucket = Bucket(10.0, 0.5, 4.0, 0.0)
    assert bucket.seconds_until(3.0, 0.0) == 0.0  # enough already
    assert bucket.seconds_until(4.0, 0.0) == 0.0
    assert bucket.seconds_until(6.0, 0.0) == 4.0  # 2 s short, 0.5 s refilled each second
    assert bucket.seconds_until(6.0, 2.0) == 2.0  # 1 s of it came in meanwhile
    assert Bucket(10.0, 0.0, 4.0, 0.0).seconds_until(6.0, 0.0) == float("inf")
    assert Bucket(10.0, 0.0, 4.0, 0.0).seconds_until(4.0, 0.0) == 0.0  # exactly there
