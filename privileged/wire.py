"""The parent's view of the child's protocol: the numbers of protocol.py as enums, the
records as dataclasses, and the strict decoder of everything the child sends.

The layouts and numbers are declared once, in privileged/protocol.py (the
child's module); this module is never loaded by the root child.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from privileged import protocol as p
from privileged.protocol import (
    MAX_LOG_TEXT,
    MAX_RECORD,
    MOUNT_FIELD,
    VERSION,
    WireError,
)

__all__ = ["MAX_LOG_TEXT", "MAX_RECORD", "MOUNT_FIELD", "VERSION", "WireError"]

REQUEST, RESULT, EVENT, HELLO = p.REQUEST_LAYOUT, p.RESULT_LAYOUT, p.EVENT_LAYOUT, p.HELLO_LAYOUT
LOG_HEADER = p.LOG_HEADER
LOG_LEVELS = frozenset({10, 20, 30, 40, 50})


class Op(enum.IntEnum):
    """Requests.  Numbered below 0x80; everything the child sends is above."""

    CHECK = p.CHECK
    FREEZE = p.FREEZE
    THAW = p.THAW
    PING = p.PING
    QUIT = p.QUIT
    REOPEN = p.REOPEN  # open the kernel device named at start-up and pass its fd back


class Kind(enum.IntEnum):
    RESULT = p.RESULT
    EVENT = p.EVENT
    HELLO = p.HELLO
    LOG = p.LOG


class Status(enum.IntEnum):
    OK = p.OK
    FAILED = p.FAILED  # tried and failed (errno and mount say why); nothing left frozen
    REFUSED = p.REFUSED  # not attempted: the budget, or a CHECK policy veto


class EventCode(enum.IntEnum):
    AUTO_THAW = p.AUTO_THAW


class Reason(enum.IntEnum):
    WATCHDOG = p.WATCHDOG
    SIGNAL = p.SIGNAL


@dataclass(frozen=True, slots=True)
class Request:
    op: Op
    seq: int


@dataclass(frozen=True, slots=True)
class Result:
    op: Op
    status: Status
    seq: int
    errno: int = 0
    count: int = 0
    elapsed_us: int = 0
    mount: str = ""

    @property
    def mounts(self) -> tuple[str, ...]:
        """After FREEZE: the mountpoints frozen, those the field held whole (`count` says
        how many there are; when the field was full, its last name may have been cut)."""
        names = [m for m in self.mount.split("\0") if m]
        return tuple(names if len(names) >= self.count else names[:-1])


@dataclass(frozen=True, slots=True)
class Event:
    code: EventCode
    reason: Reason
    count: int


@dataclass(frozen=True, slots=True)
class Hello:
    pid: int
    targets: int
    recovered: int
    devices: tuple[int, ...] = ()  # st_dev of each target's mountpoint (the first 255)


@dataclass(frozen=True, slots=True)
class Log:
    level: int
    text: str


ChildMessage = Result | Event | Hello | Log


def encode_request(req: Request) -> bytes:
    return REQUEST.pack(VERSION, req.op, 0, req.seq)


def decode_request(frame: bytes) -> Request:
    op, seq = p.decode_request(frame)
    return Request(Op(op), seq)


def encode_result(res: Result) -> bytes:
    return p.result(res.op, res.status, res.seq, err=res.errno, count=res.count,
                    elapsed_us=res.elapsed_us, mount=res.mount)


def encode_event(ev: Event) -> bytes:
    return p.event(ev.reason, ev.count)


def encode_hello(h: Hello) -> bytes:
    return p.hello(h.pid, h.targets, h.recovered, list(h.devices))


def encode_log(level: int, text: str) -> bytes:
    return p.log(level, text)


def _enum(cls: type[enum.IntEnum], value: int, what: str) -> enum.IntEnum:
    try:
        return cls(value)
    except ValueError:
        raise WireError(f"unknown {what} {value}") from None


def decode_child(frame: bytes) -> ChildMessage:
    """Decode one record from the child; any deviation raises WireError."""
    if len(frame) < 2:
        raise WireError(f"record of {len(frame)} bytes")
    if frame[0] != VERSION:
        raise WireError(f"protocol version {frame[0]}, expected {VERSION}")
    kind = _enum(Kind, frame[1], "record kind")
    if kind is Kind.LOG:
        return _decode_log(frame)
    if kind is Kind.HELLO:
        return _decode_hello(frame)
    layout = RESULT if kind is Kind.RESULT else EVENT
    if len(frame) != layout.size:
        raise WireError(f"{kind.name} of {len(frame)} bytes, expected {layout.size}")
    if kind is Kind.RESULT:
        _, _, op, status, seq, err, count, elapsed, mount = RESULT.unpack(frame)
        return Result(
            Op(_enum(Op, op, "op")),
            Status(_enum(Status, status, "status")),
            seq,
            err,
            count,
            elapsed,
            _decode_text(mount.rstrip(b"\0")),
        )
    _, _, code, reason, count, reserved = EVENT.unpack(frame)
    if reserved:
        raise WireError("reserved field is not zero")
    return Event(EventCode(_enum(EventCode, code, "event")),
                 Reason(_enum(Reason, reason, "reason")), count)


def _decode_hello(frame: bytes) -> Hello:
    if len(frame) < HELLO.size:
        raise WireError(f"HELLO of {len(frame)} bytes, at least {HELLO.size} expected")
    _, _, n, pid, targets, recovered = HELLO.unpack_from(frame)
    if n > p.MAX_DEVICES or len(frame) != HELLO.size + 8 * n:
        raise WireError(f"HELLO of {len(frame)} bytes with {n} devices")
    return Hello(pid, targets, recovered, struct.unpack_from(f"<{n}Q", frame, HELLO.size))


def _decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("text is not UTF-8") from None


def _decode_log(frame: bytes) -> Log:
    if len(frame) < LOG_HEADER.size + 1:
        raise WireError("LOG record too short")
    _, _, level, reserved, length = LOG_HEADER.unpack_from(frame)
    if reserved:
        raise WireError("reserved field is not zero")
    if level not in LOG_LEVELS:
        raise WireError(f"log level {level}")
    if not 1 <= length <= MAX_LOG_TEXT or len(frame) != LOG_HEADER.size + length:
        raise WireError(f"LOG length {length} does not match a record of {len(frame)} bytes")
    return Log(level, _decode_text(frame[LOG_HEADER.size:]))
