"""The log stream held back while frozen.

While any filesystem is frozen nothing may reach a disk: syslogd may write
synchronously to a frozen /var (microsoft/backupessentials#1 is the Linux
daemon hanging exactly so), and stderr may be a file on a frozen disk.
FreezeGate therefore keeps records in memory (bounded; what overflows is
counted and reported) from just before FREEZE until after THAW.
"""

from __future__ import annotations

import logging
from collections import deque

from agent.engine.logs import IDENT


class FreezeGate(logging.Handler):
    """Passes records to `target`, or holds them while the gate is closed."""

    def __init__(self, target: logging.Handler, capacity: int = 10000) -> None:
        super().__init__(target.level)
        self.target = target
        # multiprocessing-logging's wrapper copies our formatter onto the target: keep it.
        self.formatter = target.formatter
        self.held: deque[logging.LogRecord] = deque()
        self.capacity = capacity
        self.dropped = 0
        self.closed_gate = False

    def hold(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self.closed_gate = True

    # Not "release": logging.Handler.release() releases the handler's lock, and
    # Handler.handle() calls it after every record.
    def resume(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self.closed_gate = False
            held, self.held = self.held, deque()
            dropped, self.dropped = self.dropped, 0
        for record in held:
            self.target.handle(record)
        if dropped:
            self.target.handle(logging.makeLogRecord({
                "name": IDENT, "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": "%d log record(s) dropped while frozen (buffer of %d full)",
                "args": (dropped, self.capacity),
            }))

    def emit(self, record: logging.LogRecord) -> None:
        # emit() is also called directly, from multiprocessing-logging's receiver thread.
        with self.lock:  # type: ignore[union-attr]
            if self.closed_gate:
                # Render now: args may refer to objects that change before release.
                record.msg, record.args = record.getMessage(), None
                if len(self.held) >= self.capacity:
                    self.dropped += 1
                else:
                    self.held.append(record)
                return
        self.target.handle(record)

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        self.target.setFormatter(fmt)


def install(capacity: int) -> FreezeGate:
    """Put the gate between the root logger and the stream root set up (logs.setup)."""
    root = logging.getLogger()
    gate = FreezeGate(root.handlers[0], capacity)
    root.handlers[:] = [gate]
    return gate
