"""The parent's end of the link to the root child, once root is gone: talk to it.

agent/engine/child_start.py started it, as root.  The parent numbers its
requests and expects each answer to echo the number.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time

from agent.engine import child_start
from privileged import records, wire

log = logging.getLogger("hv-vss-agent")
child_log = logging.getLogger("hv-vss-agent.child")


class ChildGone(Exception):
    """The child closed the link or sent something malformed."""


class ChildLink:
    def __init__(self, sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        self.sock = sock
        self.proc = proc
        self.seq = 0
        self.hello: wire.Hello | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def spawn(cls, config: str | None, device: str | None, debug: bool = False,
              extra: tuple[str, ...] = ()) -> ChildLink:
        started = child_start.start(config, device, debug, extra)
        return cls(started.sock, started.proc)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, op: wire.Op) -> int:
        self.seq += 1
        try:
            self.sock.send(wire.encode_request(wire.Request(op, self.seq)))
        except OSError as e:
            self._drain()
            raise ChildGone(f"cannot send {op.name} to the child: {e.strerror}") from None
        return self.seq

    def receive(self) -> tuple[wire.ChildMessage, list[int]]:
        """One message from the child, and any descriptors it passed (REOPEN only).

        LOG records are re-emitted here and returned as well."""
        try:
            data, fds = records.receive(self.sock, wire.MAX_RECORD, max_fds=1)
        except records.RecordError as e:
            raise ChildGone(f"{e} from the child") from None
        except OSError as e:
            raise ChildGone(f"reading from the child failed: {e.strerror}") from None
        if not data:
            raise ChildGone("the child closed the link")
        try:
            msg = wire.decode_child(data)
        except wire.WireError as e:
            _close_all(fds)
            raise ChildGone(f"malformed record from the child: {e}") from None
        if fds and not (isinstance(msg, wire.Result) and msg.op is wire.Op.REOPEN):
            _close_all(fds)
            raise ChildGone("the child passed a descriptor with an unexpected record")
        if isinstance(msg, wire.Log):
            emit_child_log(msg, self.pid)
        elif isinstance(msg, wire.Result) and msg.seq != self.seq:
            _close_all(fds)
            raise ChildGone(f"answer numbered {msg.seq}, expected {self.seq}")
        return msg, fds

    def wait_hello(self, timeout: float = 20.0) -> wire.Hello:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildGone("the child did not start in time")
            self.sock.settimeout(left)
            try:
                msg, _ = self.receive()
            except TimeoutError:
                raise ChildGone("the child did not start in time") from None
            finally:
                self.sock.settimeout(None)
            if isinstance(msg, wire.Hello):
                self.hello = msg
                return msg
            if not isinstance(msg, wire.Log):
                raise ChildGone(f"expected HELLO from the child, got {msg}")

    def request(self, op: wire.Op, timeout: float = 30.0) -> tuple[wire.Result, list[int]]:
        """Synchronous request, for start-up and shutdown (the service loop is async)."""
        self.send(op)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildGone(f"no answer to {op.name} from the child")
            self.sock.settimeout(left)
            try:
                msg, fds = self.receive()
            except TimeoutError:
                raise ChildGone(f"no answer to {op.name} from the child") from None
            finally:
                self.sock.settimeout(None)
            if isinstance(msg, wire.Result):
                return msg, fds

    def _drain(self) -> None:
        """The child is gone: read what it sent before it went, without waiting (its last
        log lines, such as why it exited, would otherwise be lost)."""
        self.sock.setblocking(False)
        try:
            while True:
                _close_all(self.receive()[1])
        except ChildGone:
            pass  # nothing more: EOF, or nothing left to read (EAGAIN)

    def exit_status(self, timeout: float = 5.0) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        self.sock.close()


def emit_child_log(msg: wire.Log, pid: int) -> None:
    """A LOG record becomes a log record with whitelisted fields only, and the
    child's pid: the line is the child's, whoever writes it out."""
    record = logging.makeLogRecord({
        "name": child_log.name,
        "process": pid,
        "levelno": msg.level,
        "levelname": logging.getLevelName(msg.level),
        "msg": "[child] %s",
        "args": (msg.text,),
    })
    if child_log.isEnabledFor(msg.level):
        child_log.handle(record)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
