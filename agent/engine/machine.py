"""The VSS transaction engine: no I/O, only decisions.

Events come in (a kernel request, the child's answer or automatic thaw, the
subscribers' verdict, the kernel channel lost, time passing); actions go out
(ask the child, reply to the kernel, notify subscribers, hold or release
logs, reopen the device).  The service loop does the I/O.

One transaction at a time, as the kernel drivers guarantee.  The flows:

  CHECK   subscribers may veto -> child CHECK (policy) -> reply
  FREEZE  subscribers quiesce (within the budget) -> hold logs -> child FREEZE
          -> reply; on failure subscribers are told to resume
  THAW    child THAW -> release logs -> reply -> subscribers told (not awaited)
  other   answered at once, as the platform's stock daemon does

What subscribers' answers mean (the frontend reports them, the engine judges):
a VETO on CHECK always fails the CHECK; a subscriber that failed, timed out,
disconnected or sent garbage fails the transaction under [notify] policy =
"fail" and is logged and left behind under "skip".  Whatever the frontend
does, the engine keeps its own deadline, [notify] budget from the kernel's
request, and applies the policy itself when it passes.

Rules that keep the child's strict state machine and the host honest:
- the child is only ever asked what its state permits: FREEZE while frozen is
  answered here ("still frozen"), CHECK while frozen fails, THAW when nothing
  is frozen succeeds here (Linux's fake THAW on hibernation);
- a thaw the host did not ask for (the watchdog's, or ours before reopening
  a lost kernel channel) is recorded: the host's THAW for that freeze is
  answered HV_E_FAIL, because its snapshot may not be consistent;
- the kernel channel lost means: finish (without replies), thaw if frozen,
  then reopen.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from agent.engine.ledger import Kind, Ledger, Transaction
from agent.kernel.messages import KernelRequest
from agent.kernel.protocol import KernelProtocol
from agent.protocols.frontend import Outcome, SubscriberResult
from agent.protocols.verb import Verb
from privileged import wire

log = logging.getLogger("hv-vss-agent")

WATCHDOG_THAWED = "the watchdog had already thawed: the snapshot may not be consistent"


# --- actions ---------------------------------------------------------------------

@dataclass(frozen=True)
class AskChild:
    op: wire.Op


@dataclass(frozen=True)
class ReplyKernel:
    request: KernelRequest
    ok: bool
    txid: int = 0  # so that the service can record how long the reply took


@dataclass(frozen=True)
class Notify:
    event: Verb
    txid: int
    deadline: float  # monotonic; subscribers get no more time than this


@dataclass(frozen=True)
class HoldLogs:
    pass


@dataclass(frozen=True)
class ReleaseLogs:
    pass


@dataclass(frozen=True)
class Reopen:
    pass


Action = AskChild | ReplyKernel | Notify | HoldLogs | ReleaseLogs | Reopen


class EngineError(Exception):
    """Something that does not fit the conversation: the child's answer to nothing asked,
    or a kernel request during a transaction."""


# What a kernel request does in each state (as the child's PERMITTED, one level up): GO
# through the subscribers to the child, straight to the CHILD, or answered here (ok, why).
# LOST: thawed by the watchdog (or before a reopen) since the host's last FREEZE.
THAWED, FROZEN, LOST = "thawed", "frozen", "thawed, consistency lost"
GO, CHILD = "go", "child"
ON_REQUEST: dict[tuple[Kind, str], str | tuple[bool, str]] = {
    (Kind.CHECK, THAWED): GO,
    (Kind.CHECK, LOST): GO,
    (Kind.CHECK, FROZEN): (False, "refused: filesystems are still frozen from a previous "
                                  "FREEZE"),
    (Kind.FREEZE, THAWED): GO,
    (Kind.FREEZE, LOST): GO,
    (Kind.FREEZE, FROZEN): (True, "already frozen"),  # still frozen: the host may go on
    (Kind.THAW, FROZEN): CHILD,
    (Kind.THAW, LOST): (False, WATCHDOG_THAWED),  # once: the next THAW finds nothing
    (Kind.THAW, THAWED): (True, "nothing was frozen"),  # Linux's THAW on hibernation
}


@dataclass
class NotifyPolicy:
    enabled: bool = False  # a frontend with a subscriber socket exists
    budget: float = 12.0  # seconds for the whole transaction up to the freeze
    policy: str = "fail"  # what a frontend that misses the deadline means


class Engine:
    def __init__(self, protocol: KernelProtocol, notify: NotifyPolicy | None = None,
                 history: int = 50) -> None:
        self.protocol = protocol
        self.notify = notify or NotifyPolicy()
        self.frozen = False
        self.consistency_lost = False  # auto-thawed since the last FREEZE reply
        self.resync_needed = False
        self.kernel_lost = False
        self.tx: Transaction | None = None
        self.waiting_child: wire.Op | None = None
        self.waiting_notify: Verb | None = None
        self.notify_deadline: float | None = None
        self.stage_started = 0.0
        self.frozen_since: float | None = None
        self.frozen_mounts: tuple[str, ...] = ()  # as the child reported them
        self.frozen_count = 0  # how many: more than frozen_mounts when they did not fit
        self.ledger = Ledger(history)  # what happened, for status; never read to decide
        self._next_id = 1

    # --- inputs ---------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.tx is not None

    def on_kernel(self, req: KernelRequest, now: float,
                  kernel_deadline: float | None = None) -> list[Action]:
        """A request from the kernel.  `kernel_deadline`, when known, is the
        moment the kernel stops waiting for our answer and fails the host."""
        if self.tx is not None:
            raise EngineError("a kernel request arrived during a transaction")
        kind = Kind.OTHER if req.op is None else Kind[req.op.name]
        tx = self._begin(kind, req, now)
        tx.kernel_deadline = kernel_deadline
        self.ledger.counters[f"requests_{kind.value}"] += 1
        if kernel_deadline is not None and now >= kernel_deadline and kind is not Kind.THAW:
            # Our answer would be discarded: the host has already been told HV_E_FAIL.
            return self._finish(tx, now, False, "the kernel had already given up on this "
                                "request when it was read")
        if kind is not Kind.OTHER:
            state = FROZEN if self.frozen else LOST if self.consistency_lost else THAWED
            rule = ON_REQUEST[kind, state]
            if rule == GO:
                return self._notify_or_go(tx, Verb[kind.name], now)
            if rule == CHILD:
                return self._ask_child(tx, wire.Op[kind.name], now)
            if state == LOST:
                self.consistency_lost = False
            if kind is Kind.FREEZE and state == FROZEN:
                log.warning("FREEZE while already frozen: still frozen, answering success")
            return self._finish(tx, now, *rule)
        ok = self.protocol.unknown_ok  # as the platform's stock daemon answers
        log.warning("kernel sent unknown operation %d: answering %s", req.code,
                    "success" if ok else "failure")
        return self._finish(tx, now, ok, f"unknown operation {req.code}")

    def on_child_result(self, res: wire.Result, now: float) -> list[Action]:
        tx = self.tx
        if tx is None or self.waiting_child is None or res.op is not self.waiting_child:
            raise EngineError(f"unexpected answer to {res.op.name} from the child")
        self.waiting_child = None
        tx.timings[res.op.name.lower()] = now - self.stage_started
        ok = res.status is wire.Status.OK
        why = _explain(res)
        if res.op is wire.Op.CHECK:
            return self._finish(tx, now, ok, why)
        if res.op is wire.Op.FREEZE:
            if ok:
                self.frozen, self.consistency_lost, self.frozen_since = True, False, now
                self.frozen_mounts, self.frozen_count = res.mounts, res.count
                self.ledger.counters["freezes"] += 1
                self.ledger.histograms["freeze"].observe(tx.timings["freeze"])
                if tx.kernel_deadline is not None and now > tx.kernel_deadline:
                    # FreeBSD drops a late ack without a word (hv_vss_notified finds no
                    # msgid) and has failed the FREEZE already: nobody will snapshot.
                    log.warning("FREEZE finished after the kernel stopped waiting: thawing now")
                    late = self._finish(tx, now, False, "frozen too late: the kernel had given up")
                    if self.tx is None:  # unless _finish is already thawing (channel lost)
                        late += self._start_internal(Kind.ABANDON, now)
                    return late
                return self._finish(tx, now, not tx.abandoned, why)
            self.ledger.counters["freeze_failures"] += 1
            if res.status is wire.Status.REFUSED and res.errno == errno.EAGAIN:
                self.ledger.event("budget", now, "FREEZE refused: the frozen-time budget is spent "
                            "([watchdog] budget_seconds, budget_seconds_per_hour)")
            return [ReleaseLogs(), *self._resume_subscribers(tx, now),
                    *self._finish(tx, now, False, why)]
        if res.op is wire.Op.THAW:
            self._thawed(now)
            actions: list[Action] = [ReleaseLogs()]
            if tx.kind is Kind.THAW:
                if self.consistency_lost:
                    ok, why = False, WATCHDOG_THAWED
                self.consistency_lost = False
                return actions + self._finish(tx, now, ok, why) + self._resume_subscribers(tx, now)
            if tx.kind is Kind.RECOVER:  # thawed behind the host's back, as the watchdog does
                self.consistency_lost = True
                actions += self._resume_subscribers(tx, now)
            return actions + self._finish(tx, now, ok, why)
        raise EngineError(f"the engine never asks the child for {res.op.name}")

    def _thawed(self, now: float) -> None:
        """Nothing is frozen now: how long it was goes to the histogram, what was is gone."""
        if self.frozen and self.frozen_since is not None:
            self.ledger.histograms["frozen"].observe(now - self.frozen_since)
        self.frozen, self.frozen_since, self.frozen_mounts, self.frozen_count = False, None, (), 0

    def on_auto_thaw(self, ev: wire.Event, now: float) -> list[Action]:
        """The child thawed by itself (watchdog, or a signal before exiting)."""
        if not self.frozen:
            return []
        self._thawed(now)
        self.consistency_lost = True
        self.ledger.counters["auto_thaws"] += 1
        reason = "watchdog" if ev.reason is wire.Reason.WATCHDOG else "signal"
        log.warning("the child thawed %d filesystem(s) by itself (%s)", ev.count, reason)
        self.ledger.event(reason, now, f"the child thawed {ev.count} filesystem(s) by itself")
        actions: list[Action] = [ReleaseLogs()]
        if self.notify.enabled:
            actions.append(Notify(Verb.THAW, 0, now + self.notify.budget))
        if self.waiting_child is wire.Op.THAW:
            return actions  # the THAW in flight resynchronises the child
        if self.tx is None:
            return actions + self._start_internal(Kind.RESYNC, now)
        self.resync_needed = True
        return actions

    def on_notify_done(self, event: Verb, txid: int, results: Sequence[SubscriberResult],
                       now: float) -> list[Action]:
        """The frontend's report on one event: who answered what."""
        subs = [{"event": event.value.lower(), **r.as_dict()} for r in results]
        tx = self.tx
        if tx is None or tx.id != txid or self.waiting_notify is not event:
            # THAW is reported after the reply; anything else here came too late.
            for r in results:
                if r.outcome is not Outcome.OK:
                    log.warning("subscriber %s (uid %d, pid %d): %s on %s%s", r.name, r.uid,
                                r.pid, r.outcome.label, event.value,
                                f": {r.reason}" if r.reason else "")
            self.ledger.late_subscribers(txid, subs)
            return []
        tx.subscribers.extend(subs)
        ok, why = self._judge(event, results)
        return self._after_notify(tx, ok, now, why)

    def on_timer(self, now: float) -> list[Action]:
        tx = self.tx
        if tx is None or self.notify_deadline is None or now < self.notify_deadline:
            return []
        ok = self.notify.policy == "skip"
        event = self.waiting_notify.value if self.waiting_notify else ""
        log.warning("the agent's own deadline ([notify] budget = %.1f s from the kernel's "
                    "request) passed before the subscribers answered %s: %s", self.notify.budget,
                    event, "going on without them ([notify] policy = skip)" if ok
                    else "failing it ([notify] policy = fail)")
        self.ledger.event("budget", now, f"subscribers did not answer {event} within the budget")
        return self._after_notify(tx, ok, now, "subscribers missed the agent's deadline")

    def on_kernel_lost(self, now: float) -> list[Action]:
        self.kernel_lost = True
        self.ledger.counters["kernel_reconnects"] += 1
        self.ledger.event("kernel", now, "the kernel channel was lost: reopening it")
        if self.tx is not None:
            self.tx.abandoned = True
            return []  # the transaction ends first; _finish then recovers
        return self._recover(now)

    def deadline(self) -> float | None:
        return self.notify_deadline

    # --- flows --------------------------------------------------------------------------

    def _begin(self, kind: Kind, req: KernelRequest | None, now: float) -> Transaction:
        tx = Transaction(self._next_id, kind, req, now)
        self._next_id += 1
        self.tx = tx
        self.stage_started = now
        return tx

    def _start_internal(self, kind: Kind, now: float) -> list[Action]:
        return self._ask_child(self._begin(kind, None, now), wire.Op.THAW, now)

    def _ask_child(self, tx: Transaction, op: wire.Op, now: float) -> list[Action]:
        self.waiting_child = op
        self.stage_started = now
        return [AskChild(op)]

    def _notify_or_go(self, tx: Transaction, event: Verb, now: float) -> list[Action]:
        if not self.notify.enabled:
            return self._after_notify(tx, True, now, "")
        self.waiting_notify = event
        self.notify_deadline = tx.started + self.notify.budget
        if tx.kernel_deadline is not None:
            self.notify_deadline = min(self.notify_deadline, tx.kernel_deadline)
        self.stage_started = now
        return [Notify(event, tx.id, self.notify_deadline)]

    def _after_notify(self, tx: Transaction, ok: bool, now: float, why: str) -> list[Action]:
        if self.waiting_notify is not None:
            tx.timings["subscribers"] = now - self.stage_started
        self.waiting_notify, self.notify_deadline = None, None
        if not ok:
            self.ledger.counters["subscriber_failures"] += 1
            detail = why or "a subscriber failed"
            if tx.kind is Kind.FREEZE:
                return [*self._resume_subscribers(tx, now), *self._finish(tx, now, False, detail)]
            return self._finish(tx, now, False, detail)
        if tx.abandoned:
            return self._finish(tx, now, False, "kernel channel lost")
        if tx.kind is Kind.CHECK:
            return self._ask_child(tx, wire.Op.CHECK, now)
        if now > tx.started + self.notify.budget and self.notify.policy == "fail":
            # Answers that came in after the deadline, in the same wakeup as the timer.
            return [*self._resume_subscribers(tx, now),
                    *self._finish(tx, now, False, "the budget for this FREEZE ran out")]
        return [HoldLogs(), *self._ask_child(tx, wire.Op.FREEZE, now)]

    def _resume_subscribers(self, tx: Transaction, now: float) -> list[Action]:
        if not self.notify.enabled:
            return []
        return [Notify(Verb.THAW, tx.id, now + self.notify.budget)]

    def _finish(self, tx: Transaction, now: float, ok: bool, detail: str) -> list[Action]:
        tx.result = "ok" if ok else "failed"
        tx.detail = detail
        tx.ended = now
        tx.timings["total"] = now - tx.started
        self.tx = None
        self.ledger.finished(tx)
        if tx.kind in (Kind.RESYNC, Kind.RECOVER, Kind.ABANDON):
            self.ledger.counters[f"{tx.kind.value}s"] += 1
        else:
            self.ledger.counters[f"replies_{tx.result}"] += 1
        actions: list[Action] = []
        if tx.request is not None and not tx.abandoned:
            tx.replied = True
            actions.append(ReplyKernel(tx.request, ok, tx.id))
            if not ok:
                log.warning("%s answered failure: %s", tx.kind.value.upper(), detail)
        if tx.kind is Kind.RECOVER:
            return [*actions, Reopen()]
        if self.kernel_lost:
            return actions + self._recover(now)
        if self.resync_needed:
            self.resync_needed = False
            return actions + self._start_internal(Kind.RESYNC, now)
        return actions

    def _judge(self, event: Verb, results: Sequence[SubscriberResult]) -> tuple[bool, str]:
        """A veto fails CHECK whatever the policy; any other failure is the policy's."""
        for r in results:
            if r.outcome is Outcome.VETO and event is Verb.CHECK:
                log.warning("CHECK vetoed by subscriber %s (uid %d, pid %d): %s", r.name, r.uid,
                            r.pid, r.reason or "no reason given")
                return False, f"vetoed by subscriber {r.name}: {r.reason or 'no reason given'}"
        failed = [r for r in results if r.outcome is not Outcome.OK]
        fail = self.notify.policy == "fail"
        for r in failed:
            log.warning("subscriber %s (uid %d, pid %d): %s on %s%s: %s", r.name, r.uid, r.pid,
                        r.outcome.label, event.value, f" ({r.reason})" if r.reason else "",
                        "failing it ([notify] policy = fail)" if fail
                        else "going on without it ([notify] policy = skip)")
        if failed and fail:
            r = failed[0]
            return False, (f"subscriber {r.name}: {r.outcome.label} on {event.value}"
                           + (f" ({r.reason})" if r.reason else ""))
        if failed:
            self.ledger.counters["subscribers_skipped"] += len(failed)
        return True, ""

    def _recover(self, now: float) -> list[Action]:
        self.kernel_lost = False
        if self.frozen:
            log.warning("kernel channel lost while frozen: thawing before reopening it")
            return self._start_internal(Kind.RECOVER, now)
        return [Reopen()]


def _explain(res: wire.Result) -> str:
    if res.status is wire.Status.OK:
        return f"{res.count} filesystem(s)"
    err = os.strerror(res.errno) if res.errno else "error"
    where = f" on {res.mount}" if res.mount else ""
    verb = "refused" if res.status is wire.Status.REFUSED else "failed"
    return f"{res.op.name} {verb}{where}: {err}"
