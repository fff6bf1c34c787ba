"""multiprocessing-logging for the frontend's records, unpickling nothing but LogRecords.

multiprocessing-logging carries the frontend's log records to the engine
through a multiprocessing.Queue, whose get() unpickles whatever arrives
(multiprocessing.queues._ForkingPickler.loads).  The frontend talks to
untrusted local clients; the engine holds the kernel device and the link to
the root child.  A plain unpickler would let code running in the frontend
run code in the engine.  So the engine's queues unpickle with a pickler
whose loads() resolves no global but logging.LogRecord (the pickle
documentation's "restricting globals"), and the record is then rebuilt from
the fields a LogRecord has, each of a plain type; anything else becomes a
warning that says so.  Pickling (in the frontend) is unchanged.

This is the one place the engine unpickles, and the engine creates no other
multiprocessing queue: its link to the frontend is a closed protocol of its
own (agent/protocols/frontend.py).  Left open: a frontend can still send a huge
record (Queue.get reads a message whole before we see it), which is a denial
of service against the engine, not a way into it.

Only the frontend's records take the queue.  The library's install_mp_handler()
would route the engine's own records through it too (pickled by a feeder
thread, unpickled by the receiver thread, in the same process): two thread
hand-offs per record on the path that answers the kernel, which made a CHECK
about two milliseconds slower (3.4 ms against 1.5 ms at the median, make
bench).  So the engine keeps its handler, and the frontend swaps in the
queue's handler as it starts (use_queue).
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import multiprocessing.popen_fork  # Process.start() imports it lazily: after the chroot
import multiprocessing.queues
import pickle
import threading
from multiprocessing.reduction import ForkingPickler

import multiprocessing_logging

ALLOWED_GLOBALS = frozenset({("logging", "LogRecord")})
MAX_PICKLE = 64 << 10

_STR_FIELDS = ("name", "levelname", "pathname", "filename", "module", "funcName",
               "threadName", "processName", "exc_text", "stack_info", "taskName")
_INT_FIELDS = ("levelno", "lineno", "thread", "process")
_FLOAT_FIELDS = ("created", "msecs", "relativeCreated")


class _OnlyLogRecords(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed here")
        return logging.LogRecord


class LogRecordPickler(ForkingPickler):
    """ForkingPickler for the engine's queues: loads() yields LogRecords or refuses."""

    @classmethod
    def loads(cls, data: bytes | bytearray | memoryview, /, **_: object) -> logging.LogRecord:  # type: ignore[override]
        return safe_record(data)


def safe_record(data: bytes | bytearray | memoryview) -> logging.LogRecord:
    """The LogRecord in `data`, rebuilt from plain fields; a warning record if none."""
    if len(data) > MAX_PICKLE:
        return _refused(f"{len(data)} bytes")
    try:
        obj = _OnlyLogRecords(io.BytesIO(bytes(data))).load()
    except Exception as e:
        return _refused(f"{type(e).__name__}: {e}")
    if not isinstance(obj, logging.LogRecord):
        return _refused(f"a {type(obj).__name__}")
    return _rebuild(vars(obj))


def _rebuild(fields: dict[str, object]) -> logging.LogRecord:
    clean: dict[str, object] = {}
    for key in _STR_FIELDS:
        v = fields.get(key)
        clean[key] = v if isinstance(v, str) or v is None else str(v)
    for key in _INT_FIELDS:
        v = fields.get(key)
        clean[key] = v if isinstance(v, int) and not isinstance(v, bool) else None
    for key in _FLOAT_FIELDS:
        v = fields.get(key)
        clean[key] = float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0
    msg, args = fields.get("msg"), fields.get("args")
    # multiprocessing-logging renders msg % args before sending; render again to be sure.
    if args:
        try:
            msg = str(msg) % args
        except (TypeError, ValueError):
            msg = f"{msg!s} {args!r}"
    clean["msg"], clean["args"] = str(msg), None
    level = clean["levelno"]
    if not isinstance(level, int) or not 0 <= level <= 50:
        level = logging.WARNING
    clean["levelno"], clean["levelname"] = level, logging.getLevelName(level)
    return logging.makeLogRecord(clean)


def _refused(what: str) -> logging.LogRecord:
    return logging.makeLogRecord({
        "name": "hv-vss-agent", "levelno": logging.WARNING, "levelname": "WARNING",
        "msg": "refused a log message from the frontend that is not a plain log record (%s)",
        "args": (what[:200],)})


_frontend_handlers: list[logging.Handler] = []
_receivers: list[threading.Thread] = []


def install() -> None:
    """Before the chroot: the fork start method, the queue, the restricted loads.

    The queue's semaphores live in /dev/shm, which the chroot does not have, so the
    handlers are made here; but the library starts each handler's receiver thread in
    its constructor, and a thread keeps the capabilities it was born with (they are
    per thread): so the threads are held back here and started by start_receivers()
    once the engine holds no capability (agent/engine/privdrop.py)."""
    # multiprocessing-logging needs the fork start method; set it first (3.14 defaults to
    # forkserver, which would also start helper processes).
    multiprocessing.set_start_method("fork", force=True)
    start = threading.Thread.start
    threading.Thread.start = _hold  # type: ignore[method-assign,assignment]
    try:
        _frontend_handlers[:] = [
            multiprocessing_logging.MultiProcessingHandler(f"mp-handler-{i}", sub_handler=h)
            for i, h in enumerate(logging.getLogger().handlers)]
    finally:
        threading.Thread.start = start  # type: ignore[method-assign]
    multiprocessing.queues._ForkingPickler = LogRecordPickler  # type: ignore[attr-defined]


def _hold(thread: threading.Thread) -> None:
    _receivers.append(thread)


def start_receivers() -> None:
    """After the last capability is gone: the receivers install() held back."""
    while _receivers:
        _receivers.pop().start()


def use_queue() -> None:
    """In the frontend, first thing after the fork: its records go to the engine."""
    logging.getLogger().handlers[:] = _frontend_handlers
