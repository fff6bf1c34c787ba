"""A small Python API for applications that subscribe to the agent directly.

    from agent.clients.notify import Subscription, Veto

    def on_freeze(notice):          # notice.ms: how long we have to answer
        db.execute("CHECKPOINT")

    with Subscription("/run/hv-vss-agent-sockets/notify.sock", "mydb") as sub:
        sub.serve(on_freeze=on_freeze)

A handler that returns answers OK; one that raises Veto (CHECK only) vetoes
the backup; any other exception answers FAIL with its message, and the
agent's [notify] policy decides what that means.  The protocol is in
docs/notify-protocol.md; this module only speaks it.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import time
from collections.abc import Callable
from types import TracebackType

from agent.protocols import notify as nw
from agent.protocols.notify import Notice, NotifyProtocolError
from agent.protocols.verb import Verb

Handler = Callable[[Notice], None]


class SubscribeError(Exception):
    """Cannot subscribe: no agent, refused, or it speaks another protocol."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused  # the agent said no: waiting will not change that


class AgentGone(Exception):
    """The agent closed the connection."""


class _Refused(NotifyProtocolError):
    pass


class Veto(Exception):
    """Raised by a CHECK handler: do not take this backup (the message is the reason)."""


def connect_unix(sock: socket.socket, path: str, timeout: float) -> None:
    """connect(), waiting in the kernel while the agent's listen queue is full.

    A connect() with a Python timeout is non-blocking, and a full queue makes it
    fail at once (EAGAIN); a blocking connect() sleeps until the agent accepts
    and room is made, bounded by SO_SNDTIMEO."""
    whole = max(timeout, 0.001)
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                    struct.pack("ll", int(whole), int(whole % 1 * 1_000_000)))
    sock.connect(path)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 0))


class Subscription:
    def __init__(self, path: str, name: str, timeout: float | None = None,
                 connect_timeout: float = 5.0) -> None:
        self.path = path
        self.name = name
        self.timeout = timeout  # seconds we ask the agent to give us per event
        self.sub_id = 0
        self._buffer = nw.LineBuffer()
        self._lines: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            connect_unix(self.sock, path, connect_timeout)
            self.sock.settimeout(connect_timeout)
            self._handshake()
        except PermissionError:
            self.sock.close()
            raise SubscribeError(f"cannot subscribe at {path}: permission denied (not in the "
                                 "agent's [notify] allow_users or allow_groups?)",
                                 refused=True) from None
        except (OSError, NotifyProtocolError, AgentGone) as e:
            self.sock.close()
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise SubscribeError(f"cannot subscribe at {path}: {why}",
                                 refused=isinstance(e, _Refused)) from None
        self.sock.settimeout(None)

    def _handshake(self) -> None:
        first = self._read_message()
        if isinstance(first, nw.Refused):
            raise _Refused(f"refused: {first.reason}")
        if not isinstance(first, nw.Greeting) or first.version != nw.VERSION:
            raise NotifyProtocolError(f"unexpected greeting {first}")
        ms = int(self.timeout * 1000) if self.timeout else None
        self.sock.sendall(nw.encode_hello(nw.Hello(nw.VERSION, self.name, ms)))
        welcome = self._read_message()
        if not isinstance(welcome, nw.Welcome):
            raise NotifyProtocolError(f"not welcomed: {welcome}")
        self.sub_id = welcome.sub_id

    # --- events -----------------------------------------------------------------------------

    def next_event(self, timeout: float | None = None) -> Notice | None:
        """The next event, or None if `timeout` passed first.  Raises AgentGone."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not self._lines:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready, _, _ = select.select([self.sock], [], [], left)
                if not ready:
                    return None
            msg = self._read_message()
            if isinstance(msg, Notice):
                return msg
            if isinstance(msg, nw.Error):
                raise AgentGone(f"the agent reported an error: {msg.reason}")

    @property
    def buffered(self) -> bool:
        """Lines already read but not yet handed out (the WELCOME's recv may bring an
        event too): select() on the socket will not report them."""
        return bool(self._lines)

    def read_events(self) -> list[Notice]:
        """The events received so far, without blocking: for a caller that selects on
        this subscription (fileno) among other things.  Raises AgentGone."""
        try:
            data: bytes | None = self.sock.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            data = None
        except OSError as e:
            raise AgentGone(f"reading from the agent failed: {e.strerror}") from None
        if data == b"":
            raise AgentGone("the agent closed the connection")
        notices = []
        try:
            if data:
                self._lines += self._buffer.feed(data)
            while self._lines:
                msg = nw.decode_agent_line(self._lines.pop(0))
                if isinstance(msg, Notice):
                    notices.append(msg)
                elif isinstance(msg, nw.Error):
                    raise AgentGone(f"the agent reported an error: {msg.reason}")
        except NotifyProtocolError as e:
            raise AgentGone(f"the agent sent what we do not understand: {e}") from None
        return notices

    def ok(self, notice: Notice) -> None:
        self._answer(nw.Answer(nw.Verdict.OK, notice.event, notice.txid))

    def veto(self, notice: Notice, reason: str) -> None:
        self._answer(nw.Answer(nw.Verdict.VETO, notice.event, notice.txid, reason))

    def fail(self, notice: Notice, reason: str) -> None:
        self._answer(nw.Answer(nw.Verdict.FAIL, notice.event, notice.txid, reason))

    def serve(self, on_check: Handler | None = None, on_freeze: Handler | None = None,
              on_thaw: Handler | None = None) -> None:
        """Answer events until the agent goes away (AgentGone)."""
        handlers = {Verb.CHECK: on_check, Verb.FREEZE: on_freeze, Verb.THAW: on_thaw}
        while True:
            notice = self.next_event()
            if notice is None:
                continue
            handler = handlers[notice.event]
            try:
                if handler is not None:
                    handler(notice)
            except Veto as e:
                if notice.event is Verb.CHECK:
                    self.veto(notice, str(e) or "vetoed")
                else:
                    self.fail(notice, str(e) or "vetoed")
            except Exception as e:  # an application's failure is an answer, not a crash
                self.fail(notice, f"{type(e).__name__}: {e}")
            else:
                self.ok(notice)

    def _answer(self, answer: nw.Answer) -> None:
        try:
            self.sock.sendall(nw.encode_answer(answer))
        except OSError as e:
            raise AgentGone(f"cannot answer the agent: {e.strerror}") from None

    def _read_message(self) -> nw.AgentMessage:
        while not self._lines:
            try:
                data = self.sock.recv(4096)
            except OSError as e:
                raise AgentGone(f"reading from the agent failed: {e.strerror}") from None
            if not data:
                raise AgentGone("the agent closed the connection")
            self._lines += self._buffer.feed(data)
        return nw.decode_agent_line(self._lines.pop(0))

    # --- lifetime ------------------------------------------------------------------------------

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
