"""The real root child against a compromised parent (tests/hostile_parent.py).

Hypothesis writes the parent's side: programs of steps, mostly bursts of
cheap well-formed requests that keep one child busy, mixed with what a
compromised parent would try: truncated, long, oversized and empty records,
wrong versions, reserved bits, unknown and child-only kinds, sequence
numbers off by anything, passed descriptors, FREEZE floods, THAW without
FREEZE, requests the state does not permit, and silences long enough for
the watchdog, or for the frozen-time budget to refill.  Every record the
child sends back and every exit is checked against the model; the
filesystem is checked for real, and so is a second one the child's config
does not name, which must never be frozen.
At least 100,000 frames per run; children are respawned as they exit.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hostile_parent import (
    CHECK,
    FREEZE,
    PING,
    QUIT,
    REOPEN,
    THAW,
    Frame,
    HostileParent,
    request,
)

pytestmark = pytest.mark.root

MIN_FRAMES = 100_000
EXAMPLES = 110


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """One scratch filesystem and one hostile parent for the whole module (speed)."""
    from agent.dev import scratch
    from tests.conftest import _require_root

    _require_root()
    work = str(tmp_path_factory.mktemp("hostile"))
    os.chmod(work, 0o755)
    fs = scratch.make(work, "ext4", name="target")
    bystander = scratch.make(work, "ext4", name="bystander")
    hostile = HostileParent(work, fs.mountpoint, bystander.mountpoint)
    try:
        yield hostile
        hostile.end_child()
    finally:
        scratch.destroy(fs)  # thaws first, whatever happened
        scratch.destroy(bystander)
        for t in hostile.check.blocked + hostile.bystander_check.blocked:
            t.join(10)


# --- what a step is ---------------------------------------------------------------------------

ADVERSARIAL = st.one_of(
    st.tuples(st.just("truncated"), st.integers(1, 7)),
    st.tuples(st.just("long"), st.integers(9, 1030)),
    st.tuples(st.just("oversized"), st.integers(1031, 70_000)),
    st.tuples(st.just("empty"), st.just(0)),
    st.tuples(st.just("version"), st.integers(0, 255).filter(lambda v: v != 1)),
    st.tuples(st.just("reserved"), st.integers(1, 0xFFFF)),
    st.tuples(st.just("op"), st.integers(0, 255).filter(lambda o: not 1 <= o <= 6)),
    st.tuples(st.just("seq"), st.integers(-5, 2**32).filter(lambda d: d != 0)),
    st.tuples(st.just("random"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("fd"), st.sampled_from([CHECK, PING, FREEZE])),
)

STEP = st.integers(0, 199).flatmap(lambda dial: (
    st.tuples(st.just("burst"), st.integers(50, 1500), st.booleans()) if dial < 110 else
    st.tuples(st.just("op"), st.sampled_from([CHECK, FREEZE, THAW, PING, QUIT, REOPEN]),
              st.just(0)) if dial < 160 else
    st.tuples(st.just("bad"), ADVERSARIAL, st.integers(0, 3)) if dial < 190 else
    st.tuples(st.just("flood"), st.integers(2, 12), st.just(0)) if dial < 196 else
    st.tuples(st.just("watchdog"), st.just(0), st.just(0)) if dial < 197 else
    st.tuples(st.just("drain"), st.integers(3, 4), st.just(0)) if dial < 198 else
    st.tuples(st.just("budget"), st.just(0), st.just(0)) if dial < 199 else
    st.tuples(st.just("verify"), st.just(0), st.just(0))))


def adversarial(kind: str, arg: int | bytes, seq: int) -> Frame:
    good = request(PING, seq)
    if isinstance(arg, bytes):  # "random"
        return Frame(arg)
    frames = {
        "truncated": lambda: Frame(good[:arg]),
        "long": lambda: Frame(good + bytes(arg - len(good))),
        "oversized": lambda: Frame(bytes([1]) * arg),
        "empty": lambda: Frame(b""),
        "version": lambda: Frame(request(PING, seq, version=arg)),
        "reserved": lambda: Frame(request(PING, seq, reserved=arg)),
        "op": lambda: Frame(struct.pack("<BBHI", 1, arg, 0, seq)),
        "seq": lambda: Frame(request(PING, seq + arg)),
        "fd": lambda: Frame(request(arg, seq), pass_fd=True),
    }
    return frames[kind]()


def run_step(p: HostileParent, step: tuple) -> None:  # (kind, a, b), as STEP draws them
    kind, a, b = step
    p.ensure_child()
    seq, state = p.model.next_seq, p.model.state
    if kind == "burst":  # PINGs, and CHECKs where the state permits them
        ops = [CHECK if b and state == "thawed" and i % 16 == 0 else PING
               for i in range(a)]
        p.send([Frame(request(op, seq + i)) for i, op in enumerate(ops)])
    elif kind == "op":  # well formed; maybe not permitted now (THAW without FREEZE...)
        p.send([Frame(request(a, seq))])
    elif kind == "bad":  # a few good frames, then the bad one, then more that never count
        frames = [Frame(request(PING, seq + i)) for i in range(b)]
        frames.append(adversarial(*a, seq=seq + len(frames)))
        frames += [Frame(request(PING, seq + len(frames) + i)) for i in range(3)]
        p.send(frames)
    elif kind == "flood":
        p.send([Frame(request(FREEZE, seq + i)) for i in range(a)])
    elif kind == "watchdog":  # freeze (if the state permits) and never THAW
        if state == "thawed":
            p.send([Frame(request(FREEZE, seq))])
        p.await_watchdog()
    elif kind == "drain":  # freeze until the watchdog, again and again: the budget says no
        for _ in range(a):
            if p.model.state != "thawed":
                break
            p.send([Frame(request(FREEZE, p.model.next_seq))])
            p.await_watchdog()
            if p.model.state == "auto-thawed":
                p.send([Frame(request(THAW, p.model.next_seq))])
    elif kind == "budget":
        p.await_budget()
    else:  # verify: freeze (if the state permits), and see it for real
        if state == "thawed":
            p.send([Frame(request(FREEZE, seq))])
        p.assert_really_frozen()
    p.assert_consistent()


@pytest.mark.timeout(900)  # about 80 s here; a machine running other suites may take far longer
@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(program=st.lists(STEP, min_size=1, max_size=30))
def test_compromised_parent_cannot_break_the_child(parent, program):
    for step in program:
        run_step(parent, step)
    parent.end_child()  # EOF: whatever the state, the child thaws and exits 0


ONE_OF_EACH = {
    "truncated": ("truncated", 5), "long": ("long", 9), "oversized": ("oversized", 5000),
    "empty": ("empty", 0), "version": ("version", 2), "reserved": ("reserved", 1),
    "unknown op": ("op", 0x7F), "child's kind": ("op", 0x81), "seq + 1": ("seq", 1),
    "seq - 1": ("seq", -1), "random": ("random", b"\x01\x02\x00\x00"),
    "passed fd": ("fd", PING),
}


@pytest.mark.parametrize("attack", ONE_OF_EACH.values(), ids=ONE_OF_EACH.keys())
def test_each_attack_while_frozen_ends_the_child_thawed(parent, attack):
    """Whatever Hypothesis drew, every kind of bad frame meets a frozen child once."""
    parent.ensure_child()
    parent.await_budget()
    run_step(parent, ("op", FREEZE, 0))
    assert parent.model.state == "frozen"
    children = parent.children
    run_step(parent, ("bad", attack, 2))  # the harness checks the exit status and the thaw
    assert parent.link is None and parent.children == children


@pytest.mark.parametrize("also", [("op", THAW, 0), ("op", CHECK, 0), ("flood", 3, 0)],
                         ids=["THAW", "CHECK", "FREEZE flood"])
def test_watchdog_thaws_what_the_parent_never_thaws(parent, also):
    parent.ensure_child()
    parent.await_budget()
    run_step(parent, ("verify", 0, 0))  # FREEZE, and the write really blocks
    assert parent.model.state == "frozen"
    run_step(parent, ("watchdog", 0, 0))
    assert parent.model.state == "auto-thawed"
    run_step(parent, also)  # after an automatic thaw: THAW resyncs, the rest end the child


def test_a_parent_that_drains_the_budget_is_refused_as_the_model_says(parent):
    parent.ensure_child()
    parent.await_budget()
    refused = parent.model.refused
    run_step(parent, ("drain", 4, 0))  # four windows left to the watchdog, back to back
    assert parent.model.refused > refused, "the budget never said no"
    assert parent.model.state == "thawed"


def test_enough_frames_were_thrown(parent):
    """Runs last in this module (pytest keeps file order)."""
    print(f"\n{parent.frames} frames to {parent.children} children, "
          f"{parent.model.refused} FREEZEs refused by the budget")
    assert parent.frames >= MIN_FRAMES, f"only {parent.frames} frames"
    assert parent.children >= EXAMPLES
