"""The frontend's book of subscribers and of the events they owe an answer to; no I/O.

A round is one event (CHECK, FREEZE or THAW of one transaction) sent to every
subscriber that should hear it.  Each subscriber gets its own deadline: its
[notify] timeout (or the shorter one it asked for in HELLO), never later than
the engine's deadline less a margin, so that our answer reaches the engine
before the engine gives up on us.  A round is finished when every subscriber
in it has answered, timed out, disconnected or been thrown out for garbage.

Who hears what:
  CHECK, FREEZE  every subscriber that has said HELLO;
  THAW           every subscriber that was sent FREEZE and not yet THAW, so
                 each one sees FREEZE and THAW in pairs, including after a
                 failed FREEZE and after the watchdog thawed (txid 0).
A subscriber may owe answers to several events at once (the host can send
CHECK right after THAW, while the subscriber is still running its thaw hook):
answers name their event and transaction, so each settles its own round.  An
answer to an event it was sent earlier, already settled, is late and
ignored; an answer to anything else is garbage.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.peercred import PeerCred
from agent.protocols import notify as nw
from agent.protocols.frontend import Done, Outcome, SubscriberResult
from agent.protocols.verb import Verb

MARGIN_MAX = 0.2  # seconds kept back from the engine's deadline



class Heard(enum.Enum):
    """What the frontend should make of a line a subscriber sent."""

    WELCOME = "welcome"  # a good HELLO: send WELCOME
    RECORDED = "recorded"  # an answer to its outstanding event
    LATE = "late"  # an answer to an earlier event: ignored


class Garbage(Exception):
    """The subscriber broke the protocol; the caller disconnects it."""


@dataclass
class Subscriber:
    id: int
    cred: PeerCred
    connected: float  # monotonic
    connected_wall: float
    name: str = ""
    timeout: float | None = None  # asked for in HELLO
    outstanding: list[tuple[Verb, int]] = field(default_factory=list)
    sent: deque[tuple[Verb, int]] = field(default_factory=lambda: deque(maxlen=8))
    frozen: bool = False  # sent FREEZE, not yet THAW
    answered: int = 0

    @property
    def label(self) -> str:
        return self.name or f"#{self.id}"

    def as_dict(self, now: float) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "uid": self.cred.uid, "pid": self.cred.pid,
                "connected_since": self.connected_wall,
                "connected_seconds": round(now - self.connected, 3),
                "answered": self.answered,
                "waiting_for": [f"{e.value} {txid}" for e, txid in self.outstanding]}


@dataclass
class Round:
    event: Verb
    txid: int
    started: float
    waiting: dict[int, float] = field(default_factory=dict)  # subscriber id -> deadline
    results: dict[int, SubscriberResult] = field(default_factory=dict)

    def done(self) -> Done:
        return Done(self.event, self.txid,
                    tuple(self.results[k] for k in sorted(self.results)))


class Registry:
    def __init__(self, timeout: float, clock_wall: Callable[[], float] = time.time) -> None:
        self.timeout = timeout
        self.subs: dict[int, Subscriber] = {}
        self.rounds: list[Round] = []
        self._next_id = 1
        self._wall = clock_wall

    # --- connections --------------------------------------------------------------------

    def add(self, cred: PeerCred, now: float) -> Subscriber:
        sub = Subscriber(self._next_id, cred, now, self._wall())
        self._next_id += 1
        self.subs[sub.id] = sub
        return sub

    def gone(self, sub: Subscriber, outcome: Outcome, reason: str, now: float) -> None:
        """It disconnected or was thrown out: whatever it owed is settled as `outcome`."""
        self.subs.pop(sub.id, None)
        for rnd in self.rounds:
            if sub.id in rnd.waiting:
                self._settle(rnd, sub, outcome, reason, now)

    # --- rounds -----------------------------------------------------------------------------

    def start(self, event: Verb, txid: int, ms: int,
              now: float) -> list[tuple[Subscriber, nw.Notice]]:
        """Open a round; returns the notices to send (after which it may already be done)."""
        budget = ms / 1000
        engine_deadline = now + budget - min(MARGIN_MAX, budget / 10)
        rnd = Round(event, txid, now)
        notices = []
        for sub in self.subs.values():
            if not sub.name or (event is Verb.THAW and not sub.frozen):
                continue
            own = min(self.timeout, sub.timeout) if sub.timeout else self.timeout
            deadline = min(now + own, engine_deadline)
            rnd.waiting[sub.id] = deadline
            sub.outstanding.append((event, txid))
            sub.sent.append((event, txid))
            if event is Verb.FREEZE:
                sub.frozen = True
            elif event is Verb.THAW:
                sub.frozen = False
            notices.append((sub, nw.Notice(event, txid, max(0, int((deadline - now) * 1000)))))
        self.rounds.append(rnd)
        return notices

    def heard(self, sub: Subscriber, msg: nw.Hello | nw.Answer, now: float) -> Heard:
        if isinstance(msg, nw.Hello):
            if sub.name:
                raise Garbage("HELLO twice")
            if msg.version != nw.VERSION:
                raise Garbage(f"protocol version {msg.version} (this agent speaks {nw.VERSION})")
            sub.name = msg.name
            sub.timeout = msg.timeout_ms / 1000 if msg.timeout_ms else None
            return Heard.WELCOME
        if not sub.name:
            raise Garbage("an answer before HELLO")
        key = (msg.event, msg.txid)
        if key in sub.outstanding:
            rnd = next(r for r in self.rounds if (r.event, r.txid) == key and sub.id in r.waiting)
            outcome = {nw.Verdict.OK: Outcome.OK, nw.Verdict.VETO: Outcome.VETO,
                       nw.Verdict.FAIL: Outcome.FAILED}[msg.verdict]
            sub.answered += 1
            self._settle(rnd, sub, outcome, msg.reason, now)
            return Heard.RECORDED
        if key in sub.sent:
            return Heard.LATE
        raise Garbage(f"an answer to {msg.event.value} {msg.txid}, which it was never sent")

    def expire(self, now: float) -> list[tuple[Subscriber, Verb]]:
        """Settle every subscriber whose deadline has passed; returns who timed out."""
        late = []
        for rnd in self.rounds:
            for sub_id, deadline in list(rnd.waiting.items()):
                if now >= deadline:
                    sub = self.subs[sub_id]
                    self._settle(rnd, sub, Outcome.TIMEOUT,
                                 f"no answer within {deadline - rnd.started:.1f} s", now)
                    late.append((sub, rnd.event))
        return late

    def finished(self) -> list[Done]:
        done = [r for r in self.rounds if not r.waiting]
        self.rounds = [r for r in self.rounds if r.waiting]
        return [r.done() for r in done]

    def next_deadline(self) -> float | None:
        return min((d for r in self.rounds for d in r.waiting.values()), default=None)

    def _settle(self, rnd: Round, sub: Subscriber, outcome: Outcome, reason: str,
                now: float) -> None:
        rnd.waiting.pop(sub.id, None)
        if (rnd.event, rnd.txid) in sub.outstanding:
            sub.outstanding.remove((rnd.event, rnd.txid))
        rnd.results[sub.id] = SubscriberResult(
            sub.label, sub.cred.uid, sub.cred.pid, outcome, nw.clean_reason(reason),
            int((now - rnd.started) * 1000))
