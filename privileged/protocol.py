"""The parent <-> root child records: layouts and numbers declared once, and the child's side.

Every message is one SOCK_SEQPACKET record with a fixed layout.  Requests
(parent -> child) carry no argument at all beyond a sequence number: the child
decides what to freeze by itself, so there is nothing in a request that could
name a path, an fsid or an index.  What the child sends is decoded by the
parent just as strictly (privileged/wire.py), although the parent trusts the
child more.

Layouts (little endian):

  REQUEST  <BBHI        version, op, reserved=0, seq                     8 bytes
  RESULT   <BBBBIHHI200s version, kind, op, status, seq, errno, count,
                          elapsed_us, mount (UTF-8, NUL padded)         216 bytes
  EVENT    <BBBBHH      version, kind, code, reason, count, reserved=0    8 bytes
  HELLO    <BBHIHH + Q*n version, kind, n, pid, targets, recovered, then
                          the n device numbers (st_dev) of the targets'
                          mountpoints, n <= 255                  12 + 8n bytes
  LOG      <BBBBH + text version, kind, level, reserved=0, length,
                          then exactly `length` bytes of UTF-8 (1..1024)

RESULT's mount names the filesystem a request failed on; after a successful
FREEZE it lists what is frozen, NUL-separated (no path holds a NUL), as many as
the field holds: count says how many there are.
HELLO's device numbers let the parent keep files it writes off the
filesystems the child freezes without selecting anything itself.

This module is the child's: plain integers, no enum or dataclass (each would
load a dozen more standard modules into root).  wire.py gives the parent the
same numbers as enums and the records as dataclasses.
"""

from __future__ import annotations

import struct

VERSION = 1
CHECK, FREEZE, THAW, PING, QUIT, REOPEN = range(1, 7)  # requests: below 0x80
OP_NAMES = ("-", "CHECK", "FREEZE", "THAW", "PING", "QUIT", "REOPEN")
RESULT, EVENT, HELLO, LOG = 0x81, 0x82, 0x83, 0x84  # what the child sends: above
OK, FAILED, REFUSED = 0, 1, 2  # FAILED: tried, nothing left frozen; REFUSED: not tried
AUTO_THAW = 1  # the one event
WATCHDOG, SIGNAL = 1, 2  # why it thawed
DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40  # LOG levels: logging's numbers

REQUEST_LAYOUT = struct.Struct("<BBHI")
RESULT_LAYOUT = struct.Struct("<BBBBIHHI200s")
EVENT_LAYOUT = struct.Struct("<BBBBHH")
HELLO_LAYOUT = struct.Struct("<BBHIHH")
LOG_HEADER = struct.Struct("<BBBBH")
MOUNT_FIELD = 200
MAX_LOG_TEXT = 1024
MAX_DEVICES = 255
#: Largest record either side ever sends (a HELLO with every device); receivers use a
#: bigger buffer and treat a truncated record as a violation.
MAX_RECORD = HELLO_LAYOUT.size + 8 * MAX_DEVICES


class WireError(Exception):
    """A record that is not exactly one of the messages above."""


def decode_request(record: bytes) -> tuple[int, int]:
    """(op, seq) of a request; WireError for anything else."""
    if len(record) != REQUEST_LAYOUT.size:
        raise WireError(f"request of {len(record)} bytes, expected {REQUEST_LAYOUT.size}")
    version, op, reserved, seq = REQUEST_LAYOUT.unpack(record)
    if version != VERSION:
        raise WireError(f"protocol version {version}, expected {VERSION}")
    if reserved:
        raise WireError("reserved field is not zero")
    if not CHECK <= op <= REOPEN:
        raise WireError(f"unknown request type {op}")
    return op, seq


def clip_utf8(text: str, limit: int) -> bytes:
    """At most `limit` bytes of UTF-8, cut on a character boundary (the receiver's decode is
    strict)."""
    return text.encode("utf-8", "replace")[:limit].decode("utf-8", "ignore").encode("utf-8")


def result(op: int, status: int, seq: int, *, err: int, count: int, elapsed_us: int,
           mount: str) -> bytes:
    return RESULT_LAYOUT.pack(VERSION, RESULT, op, status, seq, min(err, 0xFFFF),
                              min(count, 0xFFFF), min(elapsed_us, 0xFFFFFFFF),
                              clip_utf8(mount, MOUNT_FIELD))


def event(reason: int, count: int) -> bytes:
    return EVENT_LAYOUT.pack(VERSION, EVENT, AUTO_THAW, reason, min(count, 0xFFFF), 0)


def hello(pid: int, targets: int, recovered: int, devices: list[int]) -> bytes:
    devices = devices[:MAX_DEVICES]
    return HELLO_LAYOUT.pack(VERSION, HELLO, len(devices), pid, min(targets, 0xFFFF),
                             min(recovered, 0xFFFF)) + struct.pack(f"<{len(devices)}Q", *devices)


def log(level: int, text: str) -> bytes:
    data = clip_utf8(text, MAX_LOG_TEXT) or b"-"
    return LOG_HEADER.pack(VERSION, LOG, level, 0, len(data)) + data
