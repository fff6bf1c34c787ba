"""The subscriber protocol, version 1: text lines, no I/O (spec: docs/notify-protocol.md).

Lines rather than binary records because subscribers are applications in any
language, and a stream socket with newline-terminated ASCII is the one thing
they can all speak (Java and Node have no SOCK_SEQPACKET).  Every line is at
most MAX_LINE bytes including the newline; a longer one is a protocol error,
so a peer can never make us buffer more than that.

  agent -> subscriber                 subscriber -> agent
  HVVSS 1                             HELLO 1 <name> [<timeout_ms>]
  WELCOME <id>                        OK <EVENT> <txid>
  REFUSED <reason>                    VETO CHECK <txid> <reason>
  CHECK|FREEZE|THAW <txid> <ms>       FAIL <EVENT> <txid> <reason>
  ERROR <reason>

Answers name the event as well as the transaction: after a failed FREEZE the
subscribers are sent THAW with the same txid, and an answer must never be
taken for the other one.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from agent.protocols.verb import Verb

VERSION = 1
MAX_LINE = 512
MAX_NAME = 64
MAX_REASON = 200
MAX_TXID = 0xFFFFFFFF
MAX_MS = 3_600_000

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}\Z")
_NUMBER = re.compile(r"[0-9]{1,10}\Z")
# Control characters, and the line separators and bidi overrides that could disguise a line.
_UNPRINTABLE = re.compile(r"[^\x20-\x7e\u00a0-\uffff]|[\u2028\u2029\u202a-\u202e\u2066-\u2069]")


class NotifyProtocolError(Exception):
    """The peer sent something that is not a version 1 line."""


class Verdict(enum.Enum):
    OK = "OK"
    VETO = "VETO"  # CHECK only: "do not take this backup", with a reason
    FAIL = "FAIL"  # "I could not do it", with a reason


# --- messages ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    name: str
    timeout_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    verdict: Verdict
    event: Verb
    txid: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Greeting:
    version: int


@dataclass(frozen=True, slots=True)
class Welcome:
    sub_id: int


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str


@dataclass(frozen=True, slots=True)
class Notice:
    """An event the agent asks the subscriber to act on, within `ms` milliseconds."""

    event: Verb
    txid: int
    ms: int


@dataclass(frozen=True, slots=True)
class Error:
    reason: str


AgentMessage = Greeting | Welcome | Refused | Notice | Error


def clean_reason(text: str) -> str:
    """What a peer says goes to the log: one line, printable, bounded."""
    return _UNPRINTABLE.sub("?", text.strip())[:MAX_REASON]


def _line(text: str) -> bytes:
    data = text.encode("utf-8", "replace") + b"\n"
    if len(data) > MAX_LINE:
        raise NotifyProtocolError(f"line of {len(data)} bytes")
    return data


# --- agent -> subscriber ------------------------------------------------------------------

def encode_greeting() -> bytes:
    return _line(f"HVVSS {VERSION}")


def encode_welcome(sub_id: int) -> bytes:
    return _line(f"WELCOME {sub_id}")


def encode_refused(reason: str) -> bytes:
    return _line(f"REFUSED {clean_reason(reason)}")


def encode_notice(n: Notice) -> bytes:
    return _line(f"{n.event.value} {n.txid} {n.ms}")


def encode_error(reason: str) -> bytes:
    return _line(f"ERROR {clean_reason(reason)}")


def decode_agent_line(line: bytes) -> AgentMessage:
    words = _words(line, 2)
    verb = words[0]
    if verb == "HVVSS" and len(words) == 2:
        return Greeting(_number(words[1], 1, 0xFFFF))
    if verb == "WELCOME" and len(words) == 2:
        return Welcome(_number(words[1], 0, MAX_TXID))
    if verb == "REFUSED":
        return Refused(" ".join(words[1:]))
    if verb == "ERROR":
        return Error(" ".join(words[1:]))
    if verb in Verb.__members__ and len(words) == 3:
        return Notice(Verb(verb), _number(words[1], 0, MAX_TXID), _number(words[2], 0, MAX_MS))
    raise NotifyProtocolError(f"unexpected line from the agent: {verb[:20]!r}")


# --- subscriber -> agent ----------------------------------------------------------------------

def encode_hello(h: Hello) -> bytes:
    if not NAME.match(h.name):
        raise NotifyProtocolError(f"subscriber name {h.name!r} is not [A-Za-z0-9._@+-], "
                                  f"1..{MAX_NAME} characters")
    tail = f" {h.timeout_ms}" if h.timeout_ms is not None else ""
    return _line(f"HELLO {h.version} {h.name}{tail}")


def encode_answer(a: Answer) -> bytes:
    if a.verdict is Verdict.OK:
        return _line(f"OK {a.event.value} {a.txid}")
    if a.verdict is Verdict.VETO and a.event is not Verb.CHECK:
        raise NotifyProtocolError("only CHECK can be vetoed")
    return _line(f"{a.verdict.value} {a.event.value} {a.txid} {clean_reason(a.reason) or '-'}")


def decode_subscriber_line(line: bytes) -> Hello | Answer:
    """Any deviation raises NotifyProtocolError: the caller treats it as garbage."""
    words = _words(line, 3)
    verb = words[0]
    if verb == "HELLO":
        if len(words) not in (3, 4):
            raise NotifyProtocolError("HELLO takes a version, a name and an optional timeout")
        version = _number(words[1], 0, 0xFFFF)
        if not NAME.match(words[2]):
            raise NotifyProtocolError("bad subscriber name")
        timeout = _number(words[3], 1, MAX_MS) if len(words) == 4 else None
        return Hello(version, words[2], timeout)
    if verb not in Verdict.__members__:
        raise NotifyProtocolError(f"unknown message {verb[:20]!r}")
    verdict = Verdict(verb)
    if words[1] not in Verb.__members__:
        raise NotifyProtocolError(f"unknown event {words[1][:20]!r}")
    event = Verb(words[1])
    txid = _number(words[2], 0, MAX_TXID)
    if verdict is Verdict.OK:
        if len(words) != 3:
            raise NotifyProtocolError("OK takes an event and a transaction id only")
        return Answer(verdict, event, txid)
    if verdict is Verdict.VETO and event is not Verb.CHECK:
        raise NotifyProtocolError("only CHECK can be vetoed")
    if len(words) < 4:
        raise NotifyProtocolError(f"{verb} needs a reason")
    return Answer(verdict, event, txid, clean_reason(" ".join(words[3:])))


def _words(line: bytes, least: int) -> list[str]:
    if len(line) > MAX_LINE:
        raise NotifyProtocolError(f"line of {len(line)} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise NotifyProtocolError("not UTF-8") from None
    text = text.removesuffix("\n").removesuffix("\r")
    words = text.split(" ")
    if len(words) < least or "" in words[:least]:
        raise NotifyProtocolError("too few fields")
    return words


def _number(word: str, lo: int, hi: int) -> int:
    if not _NUMBER.match(word):
        raise NotifyProtocolError(f"not a number: {word[:20]!r}")
    value = int(word)
    if not lo <= value <= hi:
        raise NotifyProtocolError(f"{value} is out of range")
    return value


class LineBuffer:
    """Splits a byte stream into lines, never holding more than MAX_LINE bytes."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        lines = []
        while (i := self._buf.find(b"\n")) >= 0:
            line, self._buf = self._buf[: i + 1], self._buf[i + 1:]
            if len(line) > MAX_LINE:
                raise NotifyProtocolError(f"line of {len(line)} bytes")
            lines.append(line)
        if len(self._buf) >= MAX_LINE:
            raise NotifyProtocolError(f"more than {MAX_LINE} bytes without a newline")
        return lines
