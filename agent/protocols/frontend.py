"""Engine <-> frontend records: declared once, fixed layouts, no I/O, never pickle.

The frontend talks to untrusted local clients, so the engine decodes what it
sends as strictly as the root child decodes the engine: exact lengths,
bounded counts, known codes, names from a closed alphabet, reasons clipped
and printable.  Any deviation is a WireError, and the engine then treats the
frontend as compromised (it stops; see agent/engine/service.py).

Layouts (little endian), one SOCK_SEQPACKET record each:

  NOTIFY  <BBBBII   version, kind=1, event, reserved=0, txid, ms          12 bytes
  STATUS  <BBH      version, kind=2, reserved=0, then 1..MAX_STATUS bytes of
                    UTF-8 JSON: the engine's whole status (engine -> frontend only:
                    the trusted direction)
  CHANGES <BBH      version, kind=3, reserved=0, then 1..MAX_STATUS bytes of
                    UTF-8 JSON: what changed since the STATUS or CHANGES before it
                    (make_changes, apply_changes)
  DONE    <BBBBIH   version, kind=0x81, event, reserved=0, txid, count    10 bytes
          then `count` (<= MAX_SUBSCRIBERS) entries:
  ENTRY   <BBHIII   outcome, name_len (1..64), reason_len (0..200), uid, pid,
                    elapsed_ms; then the name, then the reason
  HEARING <BBH      version, kind=0x82, count (<= MAX_SUBSCRIBERS)              4 bytes
                    how many subscribers would hear an event now (said HELLO); sent
                    at start and whenever it changes, before the subscriber is
                    welcomed, so that the engine skips the NOTIFY round trip only
                    while no one could hear it
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any, TypeVar

from agent.protocols.notify import MAX_NAME, MAX_REASON, NAME, clean_reason
from agent.protocols.verb import Verb

VERSION = 1
MAX_SUBSCRIBERS = 64
MAX_STATUS = 200_000
MAX_RECORD = 4 + MAX_STATUS  # the largest record either side sends

NOTIFY = struct.Struct("<BBBBII")
STATUS_HEADER = struct.Struct("<BBH")
DONE = struct.Struct("<BBBBIH")
HEARING = struct.Struct("<BBH")
ENTRY = struct.Struct("<BBHIII")


class WireError(Exception):
    """A record that is not exactly one of the messages above."""


class Kind(enum.IntEnum):
    NOTIFY = 1
    STATUS = 2
    CHANGES = 3
    DONE = 0x81
    HEARING = 0x82


# The event field's codes: the one place a Verb is a number on this wire.
EVENT_CODES = {Verb.CHECK: 1, Verb.FREEZE: 2, Verb.THAW: 3}
_VERBS = {code: verb for verb, code in EVENT_CODES.items()}


class Outcome(enum.IntEnum):
    """What became of one subscriber for one event."""

    OK = 0
    VETO = 1  # CHECK: the subscriber refuses this backup
    FAILED = 2  # it answered FAIL (a hook failed)
    TIMEOUT = 3  # no answer within its deadline
    DISCONNECTED = 4  # it went away before answering
    GARBAGE = 5  # it broke the protocol and was disconnected

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Notify:
    event: Verb
    txid: int
    ms: int


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """The engine's status as JSON: whole (STATUS), or what changed (CHANGES)."""

    whole: bool
    json: bytes


@dataclass(frozen=True, slots=True)
class SubscriberResult:
    name: str
    uid: int
    pid: int
    outcome: Outcome
    reason: str = ""
    elapsed_ms: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "uid": self.uid, "pid": self.pid,
                "result": self.outcome.label, "reason": self.reason,
                "seconds": self.elapsed_ms / 1000}


@dataclass(frozen=True, slots=True)
class Done:
    event: Verb
    txid: int
    results: tuple[SubscriberResult, ...]


@dataclass(frozen=True, slots=True)
class Hearing:
    """How many subscribers an event would reach now."""

    count: int


# --- engine -> frontend -------------------------------------------------------------------

def encode_notify(n: Notify) -> bytes:
    return NOTIFY.pack(VERSION, Kind.NOTIFY, EVENT_CODES[n.event], 0, n.txid & 0xFFFFFFFF,
                       max(0, min(n.ms, 0xFFFFFFFF)))


def encode_status(json_text: bytes, *, whole: bool = True) -> bytes:
    if not 1 <= len(json_text) <= MAX_STATUS:
        raise WireError(f"status of {len(json_text)} bytes")
    return STATUS_HEADER.pack(VERSION, Kind.STATUS if whole else Kind.CHANGES, 0) + json_text


def decode_engine(frame: bytes) -> Notify | StatusUpdate:
    kind = _header(frame)
    if kind is Kind.NOTIFY:
        if len(frame) != NOTIFY.size:
            raise WireError(f"NOTIFY of {len(frame)} bytes")
        _, _, event, reserved, txid, ms = NOTIFY.unpack(frame)
        if reserved:
            raise WireError("reserved field is not zero")
        return Notify(_verb(event), txid, ms)
    if kind in (Kind.STATUS, Kind.CHANGES):
        body = frame[STATUS_HEADER.size:]
        if not 1 <= len(body) <= MAX_STATUS or frame[2:4] != b"\0\0":
            raise WireError(f"bad {kind.name} record")
        return StatusUpdate(kind is Kind.STATUS, body)
    raise WireError(f"{kind.name} is not sent by the engine")


# The status is a JSON object whose "transactions" are a list of objects, each with a unique
# "id".  After every transaction most of it is as it was: CHANGES carries the keys whose
# values changed, the transactions that are new or changed (another object than before:
# the engine keeps a transaction's object while it stays the same), and the order of the
# ids.

def make_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """What turns `old` into `new` (apply_changes)."""
    was = {t["id"]: t for t in old.get("transactions") or ()}
    now = new.get("transactions")
    return {"set": {k: v for k, v in new.items()
                    if k != "transactions" and (k not in old or not same(old[k], v))},
            "unset": [k for k in old if k not in new],
            # The engine makes a transaction's object again only when it changed.
            "transactions": [t for t in now or () if was.get(t["id"]) is not t],
            "order": None if now is None else [t["id"] for t in now]}


def same(a: Any, b: Any) -> bool:
    """Equal as JSON: Python's == has 1 == 1.0 == True."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(map(same, a, b))
    return bool(a == b)


def apply_changes(old: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    new = {k: v for k, v in old.items() if k not in changes["unset"]}
    new.update(changes["set"])
    new.pop("transactions", None)
    if changes["order"] is not None:
        by_id = {t["id"]: t for t in old.get("transactions") or ()}
        by_id.update((t["id"], t) for t in changes["transactions"])
        new["transactions"] = [by_id[i] for i in changes["order"]]
    return new


# --- frontend -> engine ------------------------------------------------------------------

def encode_done(d: Done) -> bytes:
    if len(d.results) > MAX_SUBSCRIBERS:
        raise WireError(f"{len(d.results)} subscribers")
    parts = [DONE.pack(VERSION, Kind.DONE, EVENT_CODES[d.event], 0, d.txid, len(d.results))]
    for r in d.results:
        name = r.name.encode("ascii")
        reason = clean_reason(r.reason).encode("utf-8")[:MAX_REASON]
        reason = reason.decode("utf-8", "ignore").encode("utf-8")
        parts.append(ENTRY.pack(r.outcome, len(name), len(reason), r.uid, r.pid,
                                min(r.elapsed_ms, 0xFFFFFFFF)))
        parts += [name, reason]
    return b"".join(parts)


def encode_hearing(h: Hearing) -> bytes:
    if not 0 <= h.count <= MAX_SUBSCRIBERS:
        raise WireError(f"{h.count} subscribers")
    return HEARING.pack(VERSION, Kind.HEARING, h.count)


def decode_frontend(frame: bytes) -> Done | Hearing:
    kind = _header(frame)
    if kind is Kind.HEARING:
        return _decode_hearing(frame)
    if kind is not Kind.DONE:
        raise WireError(f"{kind.name} is not sent by the frontend")
    return _decode_done(frame)


def _decode_hearing(frame: bytes) -> Hearing:
    if len(frame) != HEARING.size:
        raise WireError(f"HEARING of {len(frame)} bytes")
    count = HEARING.unpack(frame)[2]
    if count > MAX_SUBSCRIBERS:
        raise WireError(f"HEARING {count} subscribers")
    return Hearing(count)


def _decode_done(frame: bytes) -> Done:
    if len(frame) < DONE.size:
        raise WireError("DONE too short")
    _, _, event, reserved, txid, count = DONE.unpack_from(frame)
    if reserved:
        raise WireError("reserved field is not zero")
    if count > MAX_SUBSCRIBERS:
        raise WireError(f"DONE with {count} subscribers")
    pos, results = DONE.size, []
    for _ in range(count):
        if len(frame) < pos + ENTRY.size:
            raise WireError("DONE entry truncated")
        outcome, name_len, reason_len, uid, pid, ms = ENTRY.unpack_from(frame, pos)
        pos += ENTRY.size
        if not 1 <= name_len <= MAX_NAME or reason_len > MAX_REASON:
            raise WireError("DONE entry lengths out of range")
        if len(frame) < pos + name_len + reason_len:
            raise WireError("DONE entry truncated")
        name = _text(frame[pos:pos + name_len])
        reason = _text(frame[pos + name_len:pos + name_len + reason_len])
        pos += name_len + reason_len
        if not NAME.match(name) or clean_reason(reason) != reason:
            raise WireError("DONE entry with a bad name or reason")
        results.append(SubscriberResult(name, uid, pid, _code(Outcome, outcome), reason, ms))
    if pos != len(frame):
        raise WireError(f"{len(frame) - pos} trailing bytes after DONE")
    return Done(_verb(event), txid, tuple(results))


def _header(frame: bytes) -> Kind:
    if len(frame) < 4:
        raise WireError(f"record of {len(frame)} bytes")
    if frame[0] != VERSION:
        raise WireError(f"version {frame[0]}, expected {VERSION}")
    return _code(Kind, frame[1])


E = TypeVar("E", bound=enum.IntEnum)


def _code(cls: type[E], value: int) -> E:
    try:
        return cls(value)
    except ValueError:
        raise WireError(f"unknown {cls.__name__} {value}") from None


def _verb(code: int) -> Verb:
    if code not in _VERBS:
        raise WireError(f"unknown event {code}")
    return _VERBS[code]


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("text is not UTF-8") from None
