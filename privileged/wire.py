"""The parent <-> root child messages: declared once, no I/O.

Every message is one SOCK_SEQPACKET record with a fixed layout.  Requests
(parent -> child) carry no argument at all beyond a sequence number: the child
decides what to freeze by itself, so there is nothing in a request that could
name a path, an fsid or an index.  Answers and log lines (child -> parent) are
decoded just as strictly, although the parent trusts the child more.

Layouts (little endian):

  REQUEST  <BBHI        version, op, reserved=0, seq                     8 bytes
  RESULT   <BBBBIHHI200s version, kind, op, status, seq, errno, count,
                          elapsed_us, mount (UTF-8, NUL padded)         216 bytes
  EVENT    <BBBBHH      version, kind, code, reason, count, reserved=0    8 bytes
  HELLO    <BBHIHH      version, kind, reserved=0, pid, targets,
                          recovered                                      12 bytes
  LOG      <BBBBH + text version, kind, level, reserved=0, length,
                          then exactly `length` bytes of UTF-8 (1..1024)

RESULT's mount names the filesystem a request failed on; after a successful
FREEZE it lists what is frozen (comma-separated, clipped to the field).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

VERSION = 1

#: Largest record either side ever sends; receivers use a bigger buffer and
#: treat MSG_TRUNC as a violation, so an oversized record is never half-read.
MAX_RECORD = 1030
MAX_LOG_TEXT = 1024
MOUNT_FIELD = 200


class Op(enum.IntEnum):
    """Requests.  Numbered below 0x80; everything the child sends is above."""

    CHECK = 1
    FREEZE = 2
    THAW = 3
    PING = 4
    QUIT = 5
    REOPEN = 6  # open the kernel device named at start-up and pass its fd back


class Kind(enum.IntEnum):
    RESULT = 0x81
    EVENT = 0x82
    HELLO = 0x83
    LOG = 0x84


class Status(enum.IntEnum):
    OK = 0
    FAILED = 1  # tried and failed (errno and mount say why); nothing left frozen
    REFUSED = 2  # not attempted: cooldown, or CHECK policy veto


class EventCode(enum.IntEnum):
    AUTO_THAW = 1


class Reason(enum.IntEnum):
    WATCHDOG = 1
    SIGNAL = 2


LOG_LEVELS = frozenset({10, 20, 30, 40, 50})

REQUEST = struct.Struct("<BBHI")
RESULT = struct.Struct("<BBBBIHHI200s")
EVENT = struct.Struct("<BBBBHH")
HELLO = struct.Struct("<BBHIHH")
LOG_HEADER = struct.Struct("<BBBBH")


class WireError(Exception):
    """A record that is not exactly one of the messages above."""


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


@dataclass(frozen=True, slots=True)
class Log:
    level: int
    text: str


ChildMessage = Result | Event | Hello | Log


def encode_request(req: Request) -> bytes:
    return REQUEST.pack(VERSION, req.op, 0, req.seq)


def decode_request(frame: bytes) -> Request:
    if len(frame) != REQUEST.size:
        raise WireError(f"request of {len(frame)} bytes, expected {REQUEST.size}")
    version, op, reserved, seq = REQUEST.unpack(frame)
    if version != VERSION:
        raise WireError(f"protocol version {version}, expected {VERSION}")
    if reserved != 0:
        raise WireError("reserved field is not zero")
    try:
        return Request(Op(op), seq)
    except ValueError:
        raise WireError(f"unknown request type {op}") from None


def _clip_utf8(text: str, limit: int) -> bytes:
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return data
    # Cut on a character boundary so the receiver's strict decode succeeds.
    return data[:limit].decode("utf-8", "ignore").encode("utf-8")


def encode_result(res: Result) -> bytes:
    return RESULT.pack(
        VERSION,
        Kind.RESULT,
        res.op,
        res.status,
        res.seq,
        min(res.errno, 0xFFFF),
        min(res.count, 0xFFFF),
        min(res.elapsed_us, 0xFFFFFFFF),
        _clip_utf8(res.mount, MOUNT_FIELD),
    )


def encode_event(ev: Event) -> bytes:
    return EVENT.pack(VERSION, Kind.EVENT, ev.code, ev.reason, min(ev.count, 0xFFFF), 0)


def encode_hello(h: Hello) -> bytes:
    return HELLO.pack(VERSION, Kind.HELLO, 0, h.pid, min(h.targets, 0xFFFF),
                      min(h.recovered, 0xFFFF))


def encode_log(level: int, text: str) -> bytes:
    data = _clip_utf8(text, MAX_LOG_TEXT) or b"-"
    return LOG_HEADER.pack(VERSION, Kind.LOG, level, 0, len(data)) + data


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
    layout = {Kind.RESULT: RESULT, Kind.EVENT: EVENT, Kind.HELLO: HELLO}[Kind(kind)]
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
    if kind is Kind.EVENT:
        _, _, code, reason, count, reserved = EVENT.unpack(frame)
        if reserved:
            raise WireError("reserved field is not zero")
        return Event(EventCode(_enum(EventCode, code, "event")),
                     Reason(_enum(Reason, reason, "reason")), count)
    _, _, reserved, pid, targets, recovered = HELLO.unpack(frame)
    if reserved:
        raise WireError("reserved field is not zero")
    return Hello(pid, targets, recovered)


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
