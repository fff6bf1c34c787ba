"""FreezeGate (engine/freeze_gate.py): nothing reaches the target while held, nothing lost."""

from __future__ import annotations

import logging

from agent.engine.freeze_gate import FreezeGate


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def gated(capacity: int = 100) -> tuple[logging.Logger, FreezeGate, Recorder]:
    target = Recorder()
    gate = FreezeGate(target, capacity)
    log = logging.getLogger(f"test-gate-{id(gate)}")
    log.propagate = False
    log.handlers[:] = [gate]
    log.setLevel(logging.DEBUG)
    return log, gate, target


def test_held_records_come_out_in_order_after_resume():
    log, gate, target = gated()
    log.info("before")
    gate.hold()
    for i in range(3):
        log.info("while frozen %d", i)
    assert target.messages == ["before"]
    gate.resume()
    assert target.messages == ["before", "while frozen 0", "while frozen 1", "while frozen 2"]
    log.info("after")
    assert target.messages[-1] == "after"


def test_overflow_is_counted_and_reported():
    log, gate, target = gated(capacity=2)
    gate.hold()
    for i in range(5):
        log.warning("r%d", i)
    gate.resume()
    assert target.messages == ["r0", "r1",
                               "3 log record(s) dropped while frozen (buffer of 2 full)"]


def test_direct_emit_is_held_too():
    """multiprocessing-logging's receiver thread calls emit() directly, not handle()."""
    _, gate, target = gated()
    gate.hold()
    gate.emit(logging.makeLogRecord({"msg": "from the frontend"}))
    assert target.messages == []
    gate.resume()
    assert target.messages == ["from the frontend"]


def test_args_are_rendered_when_held():
    log, gate, target = gated()
    state = ["frozen"]
    gate.hold()
    log.info("state is %s", state)
    state[0] = "thawed"
    gate.resume()
    assert target.messages == ["state is ['frozen']"]
