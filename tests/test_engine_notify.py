"""How the engine judges what subscribers answered, and keeps its own deadline (no I/O)."""

from __future__ import annotations

import pytest

from agent.engine import machine as E
from agent.kernel.messages import KernelRequest
from agent.kernel.protocol import LINUX
from agent.protocols.frontend import Outcome, SubscriberResult
from agent.protocols.verb import Verb
from privileged import wire

CHECK = KernelRequest(Verb.CHECK, 2, bytes(12))
FREEZE = KernelRequest(Verb.FREEZE, 5, bytes(12))
THAW = KernelRequest(Verb.THAW, 6, bytes(12))


def engine(policy: str = "fail", budget: float = 12.0) -> E.Engine:
    return E.Engine(LINUX, E.NotifyPolicy(enabled=True, budget=budget, policy=policy))


def result(outcome: Outcome, name: str = "db", reason: str = "") -> SubscriberResult:
    return SubscriberResult(name, 101, 4242, outcome, reason, 100)


def replies(actions):
    return [a.ok for a in actions if isinstance(a, E.ReplyKernel)]


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_a_veto_fails_check_whatever_the_policy(policy, caplog):
    e = engine(policy)
    [notify] = e.on_kernel(CHECK, 0.0)
    assert notify == E.Notify(Verb.CHECK, 1, 12.0)
    actions = e.on_notify_done(Verb.CHECK, 1, [result(Outcome.OK, "a"),
                                            result(Outcome.VETO, "b", "window closed")], 0.1)
    assert replies(actions) == [False]
    assert e.ledger.history[-1].detail == "vetoed by subscriber b: window closed"
    assert "CHECK vetoed by subscriber b (uid 101, pid 4242): window closed" in caplog.text


@pytest.mark.parametrize("outcome", [Outcome.FAILED, Outcome.TIMEOUT, Outcome.DISCONNECTED,
                                     Outcome.GARBAGE])
def test_other_failures_follow_the_policy(outcome, caplog):
    e = engine("fail")
    e.on_kernel(FREEZE, 0.0)
    actions = e.on_notify_done(Verb.FREEZE, 1, [result(outcome, reason="why")], 0.1)
    assert replies(actions) == [False]
    assert E.Notify(Verb.THAW, 1, 12.1) in actions  # those that quiesced resume
    assert not any(isinstance(a, E.AskChild) for a in actions)
    assert f"db (uid 101, pid 4242): {outcome.label} on FREEZE (why): failing it" in caplog.text
    counted = e.ledger.counters
    assert (counted["subscriber_failures"], counted["subscribers_skipped"]) == (1, 0)

    e = engine("skip")
    e.on_kernel(FREEZE, 0.0)
    actions = e.on_notify_done(Verb.FREEZE, 1, [result(outcome, reason="why")], 0.1)
    assert actions[:2] == [E.HoldLogs(), E.AskChild(wire.Op.FREEZE)]
    counted = e.ledger.counters
    assert (counted["subscriber_failures"], counted["subscribers_skipped"]) == (0, 1)
    assert "going on without it ([notify] policy = skip)" in caplog.text


@pytest.mark.parametrize(("policy", "froze"), [("fail", False), ("skip", True)])
def test_the_engines_own_deadline(policy, froze, caplog):
    e = engine(policy, budget=2.0)
    e.on_kernel(FREEZE, 10.0)
    assert e.deadline() == 12.0
    assert e.on_timer(11.9) == []
    actions = e.on_timer(12.0)
    assert any(isinstance(a, E.AskChild) for a in actions) is froze
    assert replies(actions) == ([] if froze else [False])
    assert "the agent's own deadline ([notify] budget = 2.0 s" in caplog.text
    assert [ev["kind"] for ev in e.ledger.events] == ["budget"]
    # the frontend's report, when it finally comes, only joins the history
    assert e.on_notify_done(Verb.FREEZE, 1, [result(Outcome.OK)], 13.0) == []


def test_answers_after_the_budget_fail_under_policy_fail():
    e = engine("fail", budget=1.0)
    e.on_kernel(FREEZE, 0.0)
    actions = e.on_notify_done(Verb.FREEZE, 1, [result(Outcome.OK)], 1.5)
    assert replies(actions) == [False]
    assert e.ledger.history[-1].detail == "the budget for this FREEZE ran out"


def test_thaw_reports_join_the_transaction_after_the_reply():
    e = engine()
    e.on_kernel(FREEZE, 0.0)
    e.on_notify_done(Verb.FREEZE, 1, [result(Outcome.OK)], 0.1)
    e.on_child_result(wire.Result(wire.Op.FREEZE, wire.Status.OK, 1, count=1,
                                  mount="/srv/db"), 0.2)
    assert e.frozen_mounts == ("/srv/db",) and e.frozen_count == 1
    e.on_kernel(THAW, 5.0)
    actions = e.on_child_result(wire.Result(wire.Op.THAW, wire.Status.OK, 2, count=1), 5.1)
    assert replies(actions) == [True] and actions[-1] == E.Notify(Verb.THAW, 2, 17.1)
    assert (e.frozen, e.frozen_mounts, e.frozen_count) == (False, (), 0)
    assert e.on_notify_done(Verb.THAW, 2, [result(Outcome.FAILED, reason="hook")], 5.5) == []
    subscribers = e.ledger.history[-1].subscribers
    assert [(s["event"], s["result"]) for s in subscribers] == [("thaw", "failed")]
    assert e.ledger.histograms["frozen"].count == 1
    assert e.ledger.histograms["freeze"].count == 1


def test_an_answer_to_the_last_request_does_not_fit_the_next_one():
    """A second CHECK waits for its subscribers before the child is asked anything: the
    child answering CHECK again then (the last CHECK's answer, twice) is refused, not taken
    for this CHECK's verdict."""
    e = engine()
    e.on_kernel(CHECK, 0.0)
    e.on_notify_done(Verb.CHECK, 1, [], 0.1)
    e.on_child_result(wire.Result(wire.Op.CHECK, wire.Status.OK, 1), 0.2)
    assert e.on_kernel(CHECK, 1.0) == [E.Notify(Verb.CHECK, 2, 13.0)]
    with pytest.raises(E.EngineError):
        e.on_child_result(wire.Result(wire.Op.CHECK, wire.Status.OK, 1), 1.1)


def test_a_kernel_lost_while_subscribers_are_asked_ends_the_transaction_failed_unanswered():
    """Nobody is left to answer: the subscribers' verdict ends it, failed, with no reply
    and nothing asked of the child, and the engine goes on to reopen."""
    e = engine()
    e.on_kernel(CHECK, 0.0)
    assert e.on_kernel_lost(0.1) == []
    actions = e.on_notify_done(Verb.CHECK, 1, [result(Outcome.OK)], 0.2)
    assert replies(actions) == [] and not any(isinstance(a, E.AskChild) for a in actions)
    assert E.Reopen() in actions
    last = e.ledger.history[-1]
    assert (last.result, last.detail) == ("failed", "kernel channel lost")


def test_reply_timing_is_recorded_on_the_transaction():
    e = engine()
    e.on_kernel(CHECK, 0.0)
    e.on_notify_done(Verb.CHECK, 1, [], 0.1)
    actions = e.on_child_result(wire.Result(wire.Op.CHECK, wire.Status.OK, 1), 0.2)
    [reply] = [a for a in actions if isinstance(a, E.ReplyKernel)]
    e.ledger.timing(reply.txid, "reply", 0.001)
    assert set(e.ledger.history[-1].timings) == {"subscribers", "check", "reply", "total"}


def test_an_auto_thaw_tells_the_subscribers_to_resume():
    e = engine(budget=12.0)
    e.on_kernel(FREEZE, 0.0)
    e.on_notify_done(Verb.FREEZE, 1, [result(Outcome.OK)], 0.1)
    e.on_child_result(wire.Result(wire.Op.FREEZE, wire.Status.OK, 1, count=1), 0.2)
    actions = e.on_auto_thaw(wire.Event(wire.EventCode.AUTO_THAW, wire.Reason.WATCHDOG, 1),
                             60.0)
    assert E.Notify(Verb.THAW, 0, 72.0) in actions


def test_the_child_s_time_is_counted_apart_from_the_subscribers():
    e = engine()
    e.on_kernel(FREEZE, 10.0)
    e.on_notify_done(Verb.FREEZE, 1, [result(Outcome.OK)], 10.5)
    e.on_child_result(wire.Result(wire.Op.FREEZE, wire.Status.OK, 1, count=1), 10.75)
    timings = e.ledger.history[-1].timings
    assert (timings["subscribers"], timings["freeze"], timings["total"]) == (0.5, 0.25, 0.75)


def test_a_late_report_logs_only_the_subscribers_that_failed(caplog):
    e = engine()
    e.on_kernel(CHECK, 0.0)
    e.on_notify_done(Verb.CHECK, 1, [], 0.1)
    e.on_child_result(wire.Result(wire.Op.CHECK, wire.Status.OK, 1), 0.2)
    caplog.clear()
    assert e.on_notify_done(Verb.CHECK, 1, [result(Outcome.OK, "fine"),
                                         result(Outcome.FAILED, "broke", "disk full")], 5.0) == []
    assert "broke (uid 101, pid 4242): failed on CHECK: disk full" in caplog.text
    assert "fine" not in caplog.text


def test_subscribers_get_no_more_time_than_the_kernel_waits():
    """FreeBSD's kernel gives up on a request at its own deadline (from its msgid): when
    that comes before [notify] budget, the subscribers' deadline is the kernel's, and
    passing it fails the FREEZE under policy "fail"."""
    e = engine(budget=12.0)
    assert e.on_kernel(FREEZE, 0.0, kernel_deadline=4.0) == [E.Notify(Verb.FREEZE, 1, 4.0)]
    assert e.on_timer(3.9) == []
    assert replies(e.on_timer(4.0)) == [False]
    later = engine(budget=12.0)  # a kernel deadline after the budget leaves the budget
    assert later.on_kernel(FREEZE, 0.0, kernel_deadline=20.0) == [E.Notify(Verb.FREEZE, 1, 12.0)]
