"""The simulator's socket protocol: the daemon's system calls on the device, as records.

One Unix SOCK_SEQPACKET connection stands for one open file of the device node.
The simulator's first record is open(2)'s result, a 4-byte errno (0: opened),
because a socket cannot refuse a connection with EBUSY.  After that, each
system call the daemon makes on the device is one request record, and the
simulator answers it with one RESULT record, exactly when and as the driver
would return from that call:

  READ  count            read(2)                         Linux
  WRITE bytes            write(2)                        Linux
  IOCTL cmd, argument    ioctl(2): IOCHVVSSREAD/WRITE    FreeBSD
  RESULT ret, bytes      ret: what the call returns, or -errno; bytes: what it
                         copied out (read's data, an IOC_OUT ioctl's buffer)

So a message is handed over only when the daemon asks for it, and a rejected
write is an error on a channel that stays open, as on the device.

poll(2) is a standing request: POLL names the events the daemon waits for,
and the simulator answers it with one READY record once the driver's poll
routine would report some (READY carries the driver's own revents).  The
daemon re-arms it after each call.  A READY is the only record that can wait
on the socket between two calls, so the socket is readable when, and one round
trip after, the device would be.  The socket's own revents are the socket's
(POLLIN|POLLRDNORM, and POLLHUP once the simulator has gone); the driver's are
in the READY record.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from agent.kernel.opening import OPEN_STATUS

POLL, READ, WRITE, IOCTL = 1, 2, 3, 4  # the daemon's requests
READY, RESULT = 0x81, 0x82  # the simulator's answers

_U32 = struct.Struct("<BI")  # POLL events, READ count, READY revents
_IOCTL = struct.Struct("<BI")  # then the argument bytes
_RESULT = struct.Struct("<Bi")  # then the bytes copied out

MAX_RECORD = 4096 + 8  # any record either side sends


class WireError(ValueError):
    """A record that is not one of this protocol's."""


@dataclass(frozen=True)
class Poll:
    events: int


@dataclass(frozen=True)
class Read:
    count: int


@dataclass(frozen=True)
class Write:
    data: bytes


@dataclass(frozen=True)
class Ioctl:
    cmd: int
    arg: bytes


@dataclass(frozen=True)
class Ready:
    revents: int


@dataclass(frozen=True)
class Result:
    ret: int
    data: bytes = b""


Request = Poll | Read | Write | Ioctl
Answer = Ready | Result


def encode(msg: Request | Answer) -> bytes:
    if isinstance(msg, Poll):
        return _U32.pack(POLL, msg.events)
    if isinstance(msg, Read):
        return _U32.pack(READ, msg.count)
    if isinstance(msg, Write):
        return bytes([WRITE]) + msg.data
    if isinstance(msg, Ioctl):
        return _IOCTL.pack(IOCTL, msg.cmd) + msg.arg
    if isinstance(msg, Ready):
        return _U32.pack(READY, msg.revents)
    return _RESULT.pack(RESULT, msg.ret) + msg.data


def decode_request(record: bytes) -> Request:
    kind = record[0] if record else None
    if kind in (POLL, READ) and len(record) == _U32.size:
        _, value = _U32.unpack(record)
        return Poll(value) if kind == POLL else Read(value)
    if kind == WRITE:
        return Write(record[1:])
    if kind == IOCTL and len(record) >= _IOCTL.size:
        _, cmd = _IOCTL.unpack_from(record)
        return Ioctl(cmd, record[_IOCTL.size:])
    raise WireError(f"not a request record: {record[:8].hex()} ({len(record)} bytes)")


def decode_answer(record: bytes) -> Answer:
    kind = record[0] if record else None
    if kind == READY and len(record) == _U32.size:
        return Ready(_U32.unpack(record)[1])
    if kind == RESULT and len(record) >= _RESULT.size:
        _, ret = _RESULT.unpack_from(record)
        return Result(ret, record[_RESULT.size:])
    raise WireError(f"not an answer record: {record[:8].hex()} ({len(record)} bytes)")


__all__ = [
    "MAX_RECORD", "OPEN_STATUS", "Answer", "Ioctl", "Poll", "Read", "Ready", "Request",
    "Result", "WireError", "Write", "decode_answer", "decode_request", "encode",
]
