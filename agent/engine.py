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

import enum
import logging
import os
from collections import Counter, deque
from dataclasses import dataclass, field

from agent.kernel.messages import KernelRequest
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


@dataclass(frozen=True)
class Notify:
    event: str  # "check" | "freeze" | "thaw"
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


class Kind(enum.Enum):
    CHECK = "check"
    FREEZE = "freeze"
    THAW = "thaw"
    OTHER = "other"
    RESYNC = "resync"  # internal: THAW to the child after its automatic thaw
    RECOVER = "recover"  # internal: thaw before reopening a lost kernel channel
    ABANDON = "abandon"  # internal: thaw a freeze the kernel gave up waiting for


@dataclass
class Transaction:
    id: int
    kind: Kind
    request: KernelRequest | None
    started: float
    kernel_deadline: float | None = None  # when the kernel stops waiting (FreeBSD: msgid)
    timings: dict[str, float] = field(default_factory=dict)
    result: str = ""
    detail: str = ""
    subscribers: list[dict[str, object]] = field(default_factory=list)
    ended: float | None = None
    replied: bool = False
    abandoned: bool = False  # the kernel channel was lost: no reply can be sent

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "op": self.kind.value,
            "code": self.request.code if self.request else None,
            "result": self.result,
            "detail": self.detail,
            "seconds": {k: round(v, 6) for k, v in self.timings.items()},
            "subscribers": self.subscribers,
        }


class EngineError(Exception):
    """The child said something that does not fit the conversation."""


@dataclass
class NotifyPolicy:
    enabled: bool = False  # a frontend with a subscriber socket exists
    budget: float = 12.0  # seconds for the whole transaction up to the freeze
    policy: str = "fail"  # what a frontend that misses the deadline means


class Engine:
    def __init__(self, protocol: str, notify: NotifyPolicy | None = None,
                 history: int = 50) -> None:
        self.protocol = protocol
        self.notify = notify or NotifyPolicy()
        self.frozen = False
        self.consistency_lost = False  # auto-thawed since the last FREEZE reply
        self.resync_needed = False
        self.kernel_lost = False
        self.tx: Transaction | None = None
        self.waiting_child: wire.Op | None = None
        self.waiting_notify: str | None = None
        self.notify_deadline: float | None = None
        self.stage_started = 0.0
        self.frozen_since: float | None = None
        self.frozen_durations: deque[float] = deque(maxlen=1000)  # seconds, for metrics
        self.history: deque[Transaction] = deque(maxlen=history)
        self.counters: Counter[str] = Counter()
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
        kind = Kind(req.op.value)
        tx = self._begin(kind, req, now)
        tx.kernel_deadline = kernel_deadline
        self.counters[f"requests_{kind.value}"] += 1
        if kernel_deadline is not None and now >= kernel_deadline and kind is not Kind.THAW:
            # Our answer would be discarded: the host has already been told HV_E_FAIL.
            return self._finish(tx, now, False, "the kernel had already given up on this "
                                "request when it was read")
        if kind is Kind.CHECK:
            if self.frozen:
                return self._finish(tx, now, False, "refused: filesystems are still frozen "
                                    "from a previous FREEZE")
            return self._notify_or_go(tx, "check", now)
        if kind is Kind.FREEZE:
            if self.frozen:
                log.warning("FREEZE while already frozen: still frozen, answering success")
                return self._finish(tx, now, True, "already frozen")
            return self._notify_or_go(tx, "freeze", now)
        if kind is Kind.THAW:
            if self.frozen:
                return self._ask_child(tx, wire.Op.THAW, now)
            if self.consistency_lost:
                self.consistency_lost = False
                return self._finish(tx, now, False, WATCHDOG_THAWED)
            return self._finish(tx, now, True, "nothing was frozen")
        ok = self.protocol == "linux"  # Linux's daemon answers success; FreeBSD's, failure
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
                self.counters["freezes"] += 1
                if tx.kernel_deadline is not None and now > tx.kernel_deadline:
                    # FreeBSD drops a late ack without a word (hv_vss_notified finds no
                    # msgid) and has failed the FREEZE already: nobody will snapshot.
                    log.warning("FREEZE finished after the kernel stopped waiting: thawing now")
                    late = self._finish(tx, now, False, "frozen too late: the kernel had given up")
                    if self.tx is None:  # unless _finish is already thawing (channel lost)
                        late += self._start_internal(Kind.ABANDON, now)
                    return late
                return self._finish(tx, now, not tx.abandoned, why)
            self.counters["freeze_failures"] += 1
            return [ReleaseLogs(), *self._resume_subscribers(tx, now),
                    *self._finish(tx, now, False, why)]
        if res.op is wire.Op.THAW:
            if self.frozen and self.frozen_since is not None:
                self.frozen_durations.append(now - self.frozen_since)
            self.frozen, self.frozen_since = False, None
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

    def on_auto_thaw(self, ev: wire.Event, now: float) -> list[Action]:
        """The child thawed by itself (watchdog, or a signal before exiting)."""
        if not self.frozen:
            return []
        if self.frozen_since is not None:
            self.frozen_durations.append(now - self.frozen_since)
        self.frozen, self.frozen_since = False, None
        self.consistency_lost = True
        self.counters["auto_thaws"] += 1
        reason = "watchdog" if ev.reason is wire.Reason.WATCHDOG else "signal"
        log.warning("the child thawed %d filesystem(s) by itself (%s)", ev.count, reason)
        actions: list[Action] = [ReleaseLogs()]
        if self.notify.enabled:
            actions.append(Notify("thaw", 0, now + self.notify.budget))
        if self.waiting_child is wire.Op.THAW:
            return actions  # the THAW in flight resynchronises the child
        if self.tx is None:
            return actions + self._start_internal(Kind.RESYNC, now)
        self.resync_needed = True
        return actions

    def on_notify_done(self, txid: int, ok: bool, subscribers: list[dict[str, object]],
                       now: float) -> list[Action]:
        tx = self.tx
        if tx is None or tx.id != txid or self.waiting_notify is None:
            for old in self.history:  # a thaw notification, reported after the reply
                if old.id == txid:
                    old.subscribers.extend(subscribers)
            return []
        tx.subscribers.extend(subscribers)
        return self._after_notify(tx, ok, now, "")

    def on_timer(self, now: float) -> list[Action]:
        tx = self.tx
        if tx is None or self.notify_deadline is None or now < self.notify_deadline:
            return []
        ok = self.notify.policy == "skip"
        log.warning("subscribers did not answer %s within the budget: %s", self.waiting_notify,
                    "going on without them" if ok else "failing")
        return self._after_notify(tx, ok, now, "subscribers missed the deadline")

    def on_kernel_lost(self, now: float) -> list[Action]:
        self.kernel_lost = True
        self.counters["kernel_reconnects"] += 1
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

    def _notify_or_go(self, tx: Transaction, event: str, now: float) -> list[Action]:
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
            self.counters["subscriber_failures"] += 1
            detail = why or _subscriber_failure(tx)
            if tx.kind is Kind.FREEZE:
                return [*self._resume_subscribers(tx, now), *self._finish(tx, now, False, detail)]
            return self._finish(tx, now, False, detail)
        if tx.abandoned:
            return self._finish(tx, now, False, "kernel channel lost")
        if tx.kind is Kind.CHECK:
            return self._ask_child(tx, wire.Op.CHECK, now)
        if now > tx.started + self.notify.budget:
            return [*self._resume_subscribers(tx, now),
                    *self._finish(tx, now, False, "the budget for this FREEZE ran out")]
        return [HoldLogs(), *self._ask_child(tx, wire.Op.FREEZE, now)]

    def _resume_subscribers(self, tx: Transaction, now: float) -> list[Action]:
        if not self.notify.enabled:
            return []
        return [Notify("thaw", tx.id, now + self.notify.budget)]

    def _finish(self, tx: Transaction, now: float, ok: bool, detail: str) -> list[Action]:
        tx.result = "ok" if ok else "failed"
        tx.detail = detail
        tx.ended = now
        tx.timings["total"] = now - tx.started
        self.tx = None
        self.history.append(tx)
        if tx.kind in (Kind.RESYNC, Kind.RECOVER, Kind.ABANDON):
            self.counters[f"{tx.kind.value}s"] += 1
        else:
            self.counters[f"replies_{tx.result}"] += 1
        actions: list[Action] = []
        if tx.request is not None and not tx.abandoned:
            tx.replied = True
            actions.append(ReplyKernel(tx.request, ok))
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


def _subscriber_failure(tx: Transaction) -> str:
    for s in tx.subscribers:
        if s.get("result") not in ("ok", "skipped"):
            return f"subscriber {s.get('name')}: {s.get('result')} {s.get('reason') or ''}".strip()
    return "a subscriber failed"
