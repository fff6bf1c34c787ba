"""The child's end of the socketpair: strict receive, sends that never block.

Receiving: one SOCK_SEQPACKET record per call.  An empty record is EOF (the
parent is gone; with SEQPACKET a zero-length record and EOF look the same, so
the parent never sends one), and so is ECONNRESET (the parent closed with our
records still unread).  A truncated record (MSG_TRUNC), any ancillary
data (a passed descriptor, credentials) or MSG_CTRUNC is a violation; passed
descriptors are closed before we say so.

Sending: MSG_DONTWAIT, always.  A parent that stops reading must never be able
to block the child, or the watchdog could not thaw.  A log line that does not
fit is dropped and counted; an answer that does not fit is a violation.
"""

from __future__ import annotations

import array
import logging
import os
import socket

from privileged import wire

_ANC_SPACE = socket.CMSG_SPACE(64 * 4)  # room to see (and close) up to 64 passed fds


class ProtocolViolation(Exception):
    pass


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.dropped_logs = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> bytes | None:
        """One record, or None at EOF."""
        try:
            data, anc, flags, _ = self.sock.recvmsg(wire.MAX_RECORD + 1, _ANC_SPACE,
                                                    socket.MSG_DONTWAIT)
        except ConnectionResetError:
            return None  # the parent closed with our records unread: gone all the same
        if anc:
            _close_passed_fds(anc)
            raise ProtocolViolation("the parent sent ancillary data (a descriptor or credentials)")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ProtocolViolation("oversized record")
        if not data:
            return None
        return data

    def send(self, frame: bytes, fds: tuple[int, ...] = ()) -> None:
        try:
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                self.sock.sendmsg([frame], anc, socket.MSG_DONTWAIT)
            else:
                self.sock.send(frame, socket.MSG_DONTWAIT)
        except BlockingIOError:
            raise ProtocolViolation("the parent is not reading its answers") from None

    def send_log(self, level: int, text: str) -> None:
        try:
            self.sock.send(wire.encode_log(level, text), socket.MSG_DONTWAIT)
        except BlockingIOError:
            self.dropped_logs += 1
        except OSError:
            pass  # the parent is gone; the main loop will see EOF


def _close_passed_fds(anc: list[tuple[int, int, bytes]]) -> None:
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass


class FrameLogHandler(logging.Handler):
    """Child log records become LOG frames; the parent turns them back into records."""

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        level = min(max(record.levelno // 10 * 10, 10), 50)
        try:
            self.channel.send_log(level, self.format(record))
        except Exception:
            self.channel.dropped_logs += 1
