"""agent/engine/machine.py: the transaction flows, without any I/O."""

from __future__ import annotations

import errno
import os

import pytest

from agent.engine import machine as E
from agent.kernel import freebsd_wire as fw
from agent.kernel import linux_wire as lw
from agent.kernel.messages import KernelRequest
from agent.kernel.protocol import FREEBSD, LINUX, PROTOCOLS
from privileged import wire
from privileged.wire import Op, Status


def kreq(code: int) -> KernelRequest:
    return lw.decode_request(bytes([code]) + bytes(11))


def result(op: Op, status: Status = Status.OK, count: int = 2) -> wire.Result:
    return wire.Result(op, status, 1, 0 if status is Status.OK else 5, count, 0,
                       "" if status is Status.OK else "/bad")


def replies(actions: list[E.Action]) -> list[bool]:
    return [a.ok for a in actions if isinstance(a, E.ReplyKernel)]


def asks(actions: list[E.Action]) -> list[Op]:
    return [a.op for a in actions if isinstance(a, E.AskChild)]


@pytest.fixture
def eng() -> E.Engine:
    return E.Engine(LINUX)


def test_check_asks_the_child_and_replies_its_verdict(eng):
    assert not eng.busy
    assert asks(eng.on_kernel(kreq(lw.VSS_OP_HOT_BACKUP), 0.0)) == [Op.CHECK]
    assert eng.busy  # the service reads no other kernel request until the reply
    assert replies(eng.on_child_result(result(Op.CHECK), 0.1)) == [True]
    assert not eng.busy
    eng.on_kernel(kreq(lw.VSS_OP_HOT_BACKUP), 1.0)
    assert replies(eng.on_child_result(result(Op.CHECK, Status.REFUSED), 1.1)) == [False]
    assert [t.result for t in eng.ledger.history] == ["ok", "failed"]


def test_freeze_holds_logs_until_thaw(eng):
    acts = eng.on_kernel(kreq(lw.VSS_OP_FREEZE), 0.0)
    assert isinstance(acts[0], E.HoldLogs) and asks(acts) == [Op.FREEZE]
    assert replies(eng.on_child_result(result(Op.FREEZE), 0.2)) == [True]
    assert eng.frozen
    acts = eng.on_kernel(kreq(lw.VSS_OP_THAW), 5.0)
    assert asks(acts) == [Op.THAW]
    acts = eng.on_child_result(result(Op.THAW), 5.1)
    assert any(isinstance(a, E.ReleaseLogs) for a in acts) and replies(acts) == [True]
    assert not eng.frozen
    frozen = eng.ledger.histograms["frozen"]
    assert (frozen.count, frozen.total) == (1, pytest.approx(4.9))
    assert eng.ledger.history[-1].timings["thaw"] == pytest.approx(0.1)


def test_failed_freeze_releases_logs_and_fails(eng):
    eng.on_kernel(kreq(lw.VSS_OP_FREEZE), 0.0)
    acts = eng.on_child_result(result(Op.FREEZE, Status.FAILED), 0.1)
    assert any(isinstance(a, E.ReleaseLogs) for a in acts)
    assert replies(acts) == [False] and not eng.frozen
    assert not any(isinstance(a, E.Notify) for a in acts)  # no subscribers configured
    assert "FREEZE failed on /bad" in eng.ledger.history[-1].detail


def test_freeze_twice_is_answered_here_and_never_reaches_the_child(eng):
    eng.on_kernel(kreq(lw.VSS_OP_FREEZE), 0.0)
    eng.on_child_result(result(Op.FREEZE), 0.1)
    acts = eng.on_kernel(kreq(lw.VSS_OP_FREEZE), 1.0)
    assert asks(acts) == [] and replies(acts) == [True]


def test_check_while_frozen_fails_without_asking_the_child(eng):
    eng.on_kernel(kreq(lw.VSS_OP_FREEZE), 0.0)
    eng.on_child_result(result(Op.FREEZE), 0.1)
    acts = eng.on_kernel(kreq(lw.VSS_OP_HOT_BACKUP), 1.0)
    assert asks(acts) == [] and replies(acts) == [False]


@pytest.mark.parametrize("protocol", ["linux", "freebsd"])
def test_thaw_without_freeze_succeeds(protocol):
    """On both systems (an unknown operation would be a failure on FreeBSD)."""
    eng = E.Engine(PROTOCOLS[protocol])
    thaw = kreq(lw.VSS_OP_THAW) if protocol == "linux" else \
        fw.decode_request(fw.MSG.pack(fw.HV_VSS_THAW, 0, 7, bytes(48)))
    assert thaw is not None
    acts = eng.on_kernel(thaw, 0.0)
    assert asks(acts) == [] and replies(acts) == [True]
    assert eng.ledger.history[-1].detail == "nothing was frozen"


def test_auto_thaw_resyncs_the_child_and_fails_the_next_thaw(eng):
    eng.on_kernel(kreq(lw.VSS_OP_FREEZE), 0.0)
    eng.on_child_result(result(Op.FREEZE), 0.1)
    assert eng.frozen_count == 2
    acts = eng.on_auto_thaw(wire.Event(wire.EventCode.AUTO_THAW, wire.Reason.WATCHDOG, 2), 60.0)
    assert (eng.frozen, eng.frozen_mounts, eng.frozen_count) == (False, (), 0)
    frozen = eng.ledger.histograms["frozen"]
    assert (frozen.count, frozen.total) == (1, pytest.approx(59.9))
    assert any(isinstance(a, E.ReleaseLogs) for a in acts)
    assert asks(acts) == [Op.THAW]  # resync: the child is AUTO_THAWED until it hears THAW
    assert replies(eng.on_child_result(result(Op.THAW, count=0), 60.1)) == []
    acts = eng.on_kernel(kreq(lw.VSS_OP_THAW), 61.0)
    assert asks(acts) == [] and replies(acts) == [False]
    assert eng.ledger.history[-1].detail == E.WATCHDOG_THAWED
    assert replies(eng.on_kernel(kreq(lw.VSS_OP_THAW), 62.0)) == [True]  # said only once


def test_after_an_auto_thaw_a_new_backup_goes_to_the_child_and_its_freeze_counts(eng):
    """The host may give up on that backup and start another: its CHECK and FREEZE go to
    the child as always, and a THAW after that FREEZE thaws it, without the failure the
    auto-thaw left for the old backup's THAW."""
    eng.on_kernel(kreq(lw.VSS_OP_FREEZE), 0.0)
    eng.on_child_result(result(Op.FREEZE), 0.1)
    eng.on_auto_thaw(wire.Event(wire.EventCode.AUTO_THAW, wire.Reason.WATCHDOG, 2), 60.0)
    eng.on_child_result(result(Op.THAW, count=0), 60.1)  # the resync
    assert eng.consistency_lost
    assert asks(eng.on_kernel(kreq(lw.VSS_OP_HOT_BACKUP), 70.0)) == [Op.CHECK]
    assert replies(eng.on_child_result(result(Op.CHECK), 70.1)) == [True]
    assert asks(eng.on_kernel(kreq(lw.VSS_OP_FREEZE), 71.0)) == [Op.FREEZE]
    assert replies(eng.on_child_result(result(Op.FREEZE), 71.1)) == [True]
    assert asks(eng.on_kernel(kreq(lw.VSS_OP_THAW), 72.0)) == [Op.THAW]
    assert replies(eng.on_child_result(result(Op.THAW), 72.1)) == [True]


def test_auto_thaw_while_host_thaw_is_in_flight_needs_no_resync(eng):
    eng.on_kernel(kreq(lw.VSS_OP_FREEZE), 0.0)
    eng.on_child_result(result(Op.FREEZE), 0.1)
    eng.on_kernel(kreq(lw.VSS_OP_THAW), 59.9)
    acts = eng.on_auto_thaw(wire.Event(wire.EventCode.AUTO_THAW, wire.Reason.WATCHDOG, 2), 60.0)
    assert asks(acts) == []
    assert replies(eng.on_child_result(result(Op.THAW, count=0), 60.1)) == [False]
    # that failure told the host: a THAW after it finds nothing frozen, as without the race
    assert replies(eng.on_kernel(kreq(lw.VSS_OP_THAW), 61.0)) == [True]
    assert eng.ledger.history[-1].detail == "nothing was frozen"


@pytest.mark.parametrize(("protocol", "ok"), [("linux", True), ("freebsd", False)])
def test_unknown_operation_is_answered_as_the_stock_daemon_does(protocol, ok):
    eng = E.Engine(PROTOCOLS[protocol])
    if protocol == "linux":
        req = kreq(lw.VSS_OP_BU_COMPLETE)
    else:
        req = fw.decode_request(fw.MSG.pack(9, 0, 1, bytes(48)))
        assert req is not None
    assert replies(eng.on_kernel(req, 0.0)) == [ok]


def test_kernel_lost_while_frozen_thaws_then_reopens(eng):
    eng.on_kernel(kreq(lw.VSS_OP_FREEZE), 0.0)
    eng.on_child_result(result(Op.FREEZE), 0.1)
    acts = eng.on_kernel_lost(1.0)
    assert asks(acts) == [Op.THAW]
    acts = eng.on_child_result(result(Op.THAW), 1.1)
    assert any(isinstance(a, E.Reopen) for a in acts) and not eng.frozen
    assert replies(eng.on_kernel(kreq(lw.VSS_OP_THAW), 2.0)) == [False]  # told the truth


def test_kernel_lost_mid_freeze_finishes_then_thaws_then_reopens(eng):
    eng.on_kernel(kreq(lw.VSS_OP_FREEZE), 0.0)
    assert eng.on_kernel_lost(0.05) == []  # the child is still freezing
    acts = eng.on_child_result(result(Op.FREEZE), 0.1)
    assert replies(acts) == [] and asks(acts) == [Op.THAW]  # no reply can be sent
    acts = eng.on_child_result(result(Op.THAW), 0.2)
    assert any(isinstance(a, E.Reopen) for a in acts)


def test_kernel_lost_when_idle_reopens_at_once(eng):
    assert eng.on_kernel_lost(0.0) == [E.Reopen()]


def test_an_answer_nobody_asked_for_is_an_error(eng):
    with pytest.raises(E.EngineError):
        eng.on_child_result(result(Op.FREEZE), 0.0)
    eng.on_kernel(kreq(lw.VSS_OP_HOT_BACKUP), 0.0)
    with pytest.raises(E.EngineError):
        eng.on_child_result(result(Op.FREEZE), 0.1)


def test_kernel_request_during_a_transaction_is_an_error(eng):
    eng.on_kernel(kreq(lw.VSS_OP_HOT_BACKUP), 0.0)
    with pytest.raises(E.EngineError):
        eng.on_kernel(kreq(lw.VSS_OP_HOT_BACKUP), 0.1)


def freebsd_freeze() -> KernelRequest:
    req = fw.decode_request(fw.MSG.pack(fw.HV_VSS_FREEZE, 0, 123, bytes(48)))
    assert req is not None
    return req


def test_a_freeze_the_kernel_already_gave_up_on_is_not_started():
    eng = E.Engine(FREEBSD)
    acts = eng.on_kernel(freebsd_freeze(), 20.0, kernel_deadline=15.0)
    assert asks(acts) == [] and replies(acts) == [False]


def test_a_freeze_finished_after_the_kernel_gave_up_is_thawed_at_once():
    eng = E.Engine(FREEBSD)
    assert asks(eng.on_kernel(freebsd_freeze(), 0.0, kernel_deadline=15.0)) == [Op.FREEZE]
    acts = eng.on_child_result(result(Op.FREEZE), 16.0)
    assert replies(acts) == [False]  # the kernel drops it; the host already has HV_E_FAIL
    assert asks(acts) == [Op.THAW]
    assert eng.ledger.history[-1].detail == "frozen too late: the kernel had given up"
    eng.on_child_result(result(Op.THAW), 16.1)
    assert not eng.frozen
    assert eng.ledger.history[-1].kind is E.Kind.ABANDON


def test_in_time_freebsd_freeze_stays_frozen():
    eng = E.Engine(FREEBSD)
    eng.on_kernel(freebsd_freeze(), 0.0, kernel_deadline=15.0)
    acts = eng.on_child_result(result(Op.FREEZE), 1.0)
    assert replies(acts) == [True] and asks(acts) == [] and eng.frozen


def test_a_session_s_counters_events_and_history_add_up():
    """What status and metrics report: every request counted once, each reply as ok or
    failed (the two add up to the requests), the engine's own transactions apart."""
    eng = E.Engine(LINUX)
    watchdog = wire.Event(wire.EventCode.AUTO_THAW, wire.Reason.WATCHDOG, 2)
    steps = [
        (lw.VSS_OP_HOT_BACKUP, Op.CHECK, Status.OK),
        (lw.VSS_OP_HOT_BACKUP, Op.CHECK, Status.REFUSED),
        (lw.VSS_OP_FREEZE, Op.FREEZE, Status.OK),
        (lw.VSS_OP_THAW, Op.THAW, Status.OK),
        (lw.VSS_OP_FREEZE, Op.FREEZE, Status.FAILED),
        (lw.VSS_OP_FREEZE, Op.FREEZE, Status.OK),
    ]
    for i, (code, op, status) in enumerate(steps):
        assert asks(eng.on_kernel(kreq(code), float(i))) == [op]
        assert replies(eng.on_child_result(result(op, status), i + 0.1)) == [status is Status.OK]
    assert asks(eng.on_auto_thaw(watchdog, 65.0)) == [Op.THAW]  # the resync
    assert replies(eng.on_child_result(result(Op.THAW, count=0), 65.1)) == []
    assert replies(eng.on_kernel(kreq(lw.VSS_OP_THAW), 66.0)) == [False]
    assert replies(eng.on_kernel(kreq(lw.VSS_OP_BU_COMPLETE), 67.0)) == [True]
    assert eng.on_kernel_lost(68.0) == [E.Reopen()]
    assert dict(eng.ledger.counters) == {
        "requests_check": 2, "requests_freeze": 3, "requests_thaw": 2, "requests_other": 1,
        "replies_ok": 5, "replies_failed": 3,
        "freezes": 2, "freeze_failures": 1, "auto_thaws": 1, "resyncs": 1,
        "kernel_reconnects": 1, "events_watchdog": 1, "events_kernel": 1}
    assert [e["kind"] for e in eng.ledger.events] == ["watchdog", "kernel"]
    assert [(t.kind.value, t.result) for t in eng.ledger.history] == [
        ("check", "ok"), ("check", "failed"), ("freeze", "ok"), ("thaw", "ok"),
        ("freeze", "failed"), ("freeze", "ok"), ("resync", "ok"), ("thaw", "failed"),
        ("other", "ok")]


@pytest.mark.parametrize(("reason", "kind"), [(wire.Reason.WATCHDOG, "watchdog"),
                                              (wire.Reason.SIGNAL, "signal")])
def test_an_auto_thaw_is_an_event_named_for_its_reason(eng, reason, kind):
    eng.on_kernel(kreq(lw.VSS_OP_FREEZE), 0.0)
    eng.on_child_result(result(Op.FREEZE), 0.1)
    eng.on_auto_thaw(wire.Event(wire.EventCode.AUTO_THAW, reason, 2), 1.0)
    assert [(e["kind"], e["detail"]) for e in eng.ledger.events] == [
        (kind, "the child thawed 2 filesystem(s) by itself")]
    assert eng.ledger.counters[f"events_{kind}"] == 1


def test_a_freeze_the_budget_refuses_is_an_event_and_a_failure(eng):
    eng.on_kernel(kreq(lw.VSS_OP_FREEZE), 0.0)
    refused = wire.Result(Op.FREEZE, Status.REFUSED, 1, errno.EAGAIN)
    acts = eng.on_child_result(refused, 0.1)
    assert replies(acts) == [False] and any(isinstance(a, E.ReleaseLogs) for a in acts)
    assert [e["kind"] for e in eng.ledger.events] == ["budget"]
    assert eng.ledger.counters["freeze_failures"] == 1
    # refused for another reason (a veto): a failure, not the budget's event
    eng.on_kernel(kreq(lw.VSS_OP_FREEZE), 1.0)
    eng.on_child_result(wire.Result(Op.FREEZE, Status.REFUSED, 2, errno.EPERM, 0, 0, "/x"), 1.1)
    assert [e["kind"] for e in eng.ledger.events] == ["budget"]
    assert eng.ledger.history[-1].detail == f"FREEZE refused on /x: {os.strerror(errno.EPERM)}"


def test_a_transaction_reports_its_timings_to_the_microsecond(eng):
    eng.on_kernel(kreq(lw.VSS_OP_HOT_BACKUP), 1.0)
    eng.on_child_result(result(Op.CHECK), 1.1234567)
    seconds = eng.ledger.history[-1].as_dict()["seconds"]
    assert seconds == {"check": 0.123457, "total": 0.123457}


def test_once_reopened_the_engine_does_not_reopen_again(eng):
    assert eng.on_kernel_lost(0.0) == [E.Reopen()]
    eng.on_kernel(kreq(lw.VSS_OP_HOT_BACKUP), 1.0)
    acts = eng.on_child_result(result(Op.CHECK), 1.1)
    assert replies(acts) == [True] and not any(isinstance(a, E.Reopen) for a in acts)
