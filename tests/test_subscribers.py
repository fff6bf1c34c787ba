"""The frontend's book of subscribers and rounds, with a clock we move by hand."""

from __future__ import annotations

import pytest

from agent.frontend.subscribers import Garbage, Heard, Registry
from agent.peercred import PeerCred
from agent.protocols import notify as nw
from agent.protocols.frontend import Outcome
from agent.protocols.verb import Verb

CRED = PeerCred(101, 101, frozenset({101}), 4242)


def named(reg: Registry, name: str, now: float = 0.0, timeout_ms: int | None = None):
    sub = reg.add(CRED, now)
    assert reg.heard(sub, nw.Hello(1, name, timeout_ms), now) is Heard.WELCOME
    return sub


def answer(verdict, event, txid, reason=""):
    return nw.Answer(verdict, event, txid, reason)


def test_a_round_without_subscribers_is_done_at_once():
    reg = Registry(timeout=5)
    assert reg.start(Verb.FREEZE, 1, 10_000, 0.0) == []
    [done] = reg.finished()
    assert (done.txid, done.results) == (1, ())


def test_each_subscriber_gets_its_own_deadline_within_the_engines():
    reg = Registry(timeout=5)
    named(reg, "a")
    b = named(reg, "b", timeout_ms=1000)
    notices = dict((s.name, n) for s, n in reg.start(Verb.FREEZE, 1, 3000, 0.0))
    assert notices["b"].ms == 1000  # what it asked for
    assert notices["a"].ms == 2800  # the engine's 3 s less the margin, not its 5 s timeout
    reg.heard(b, answer(nw.Verdict.OK, Verb.FREEZE, 1), 0.5)
    assert reg.expire(2.0) == []
    assert [(s.name, e) for s, e in reg.expire(2.8)] == [("a", Verb.FREEZE)]
    [done] = reg.finished()
    assert [(r.name, r.outcome) for r in done.results] == [("a", Outcome.TIMEOUT),
                                                          ("b", Outcome.OK)]
    assert done.results[1].elapsed_ms == 500


def test_thaw_goes_to_those_told_to_freeze_including_after_an_auto_thaw():
    reg = Registry(timeout=5)
    early = named(reg, "early")
    reg.start(Verb.FREEZE, 1, 3000, 0.0)
    late = named(reg, "late", 0.1)  # connected while frozen: never told FREEZE
    reg.heard(early, answer(nw.Verdict.OK, Verb.FREEZE, 1), 0.2)
    notices = reg.start(Verb.THAW, 0, 3000, 1.0)  # the watchdog's thaw has no txid
    assert [s.name for s, _ in notices] == ["early"]
    assert reg.start(Verb.THAW, 2, 3000, 1.1) == []  # told once
    assert late.frozen is False


def test_answers_settle_their_own_round_even_when_several_are_owed():
    reg = Registry(timeout=5)
    sub = named(reg, "hook")
    reg.start(Verb.FREEZE, 2, 5000, 0.0)
    reg.heard(sub, answer(nw.Verdict.OK, Verb.FREEZE, 2), 0.0)
    reg.finished()
    reg.start(Verb.THAW, 3, 5000, 0.0)
    reg.start(Verb.CHECK, 4, 5000, 0.1)  # the host is quick; the thaw hook still runs
    assert reg.heard(sub, answer(nw.Verdict.OK, Verb.THAW, 3), 1.0) is Heard.RECORDED
    assert reg.heard(sub, answer(nw.Verdict.VETO, Verb.CHECK, 4, "no"), 1.1) \
        is Heard.RECORDED
    done = {d.txid: d.results[0] for d in reg.finished()}
    assert done[3].outcome is Outcome.OK
    assert (done[4].outcome, done[4].reason) == (Outcome.VETO, "no")


def test_late_answers_are_ignored_and_unasked_ones_are_garbage():
    reg = Registry(timeout=1)
    sub = named(reg, "s")
    reg.start(Verb.FREEZE, 1, 5000, 0.0)
    reg.expire(1.0)
    assert reg.heard(sub, answer(nw.Verdict.OK, Verb.FREEZE, 1), 1.5) is Heard.LATE
    with pytest.raises(Garbage):
        reg.heard(sub, answer(nw.Verdict.OK, Verb.THAW, 1), 1.6)
    with pytest.raises(Garbage):
        reg.heard(sub, answer(nw.Verdict.OK, Verb.FREEZE, 2), 1.6)


@pytest.mark.parametrize("first", [
    nw.Answer(nw.Verdict.OK, Verb.CHECK, 1),  # before HELLO
    nw.Hello(2, "future"),  # a version we do not speak
])
def test_protocol_order_is_enforced(first):
    reg = Registry(timeout=1)
    sub = reg.add(CRED, 0.0)
    with pytest.raises(Garbage):
        reg.heard(sub, first, 0.0)


def test_hello_twice_is_garbage():
    reg = Registry(timeout=1)
    sub = named(reg, "s")
    with pytest.raises(Garbage):
        reg.heard(sub, nw.Hello(1, "again"), 0.0)


def test_a_subscriber_that_goes_away_settles_everything_it_owed():
    reg = Registry(timeout=5)
    sub = named(reg, "s")
    reg.start(Verb.FREEZE, 1, 5000, 0.0)
    reg.start(Verb.CHECK, 2, 5000, 0.0)
    reg.gone(sub, Outcome.DISCONNECTED, "disconnected", 0.3)
    assert {d.txid: d.results[0].outcome for d in reg.finished()} == {
        1: Outcome.DISCONNECTED, 2: Outcome.DISCONNECTED}
    assert reg.subs == {}
