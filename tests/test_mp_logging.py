"""agent/mp_logging.py: the engine unpickles LogRecords of plain values, and nothing else."""

from __future__ import annotations

import ast
import logging
import os
import pickle
import subprocess
import sys
from multiprocessing.reduction import ForkingPickler

from agent.mp_logging import MAX_PICKLE, safe_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Exploit:
    """Unpickling this runs a command: what a subverted frontend would send."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[list[str]]]:
        return subprocess.call, (["touch", self.marker],)


def test_a_real_record_comes_through_with_its_fields():
    rec = logging.LogRecord("hv-vss-agent.frontend", logging.WARNING, "/x.py", 7,
                            "subscriber %s refused", ("db",), None, func="serve")
    out = safe_record(ForkingPickler.dumps(rec))
    assert (out.name, out.levelno, out.levelname, out.lineno, out.funcName) == \
        ("hv-vss-agent.frontend", logging.WARNING, "WARNING", 7, "serve")
    assert out.getMessage() == "subscriber db refused"


def test_code_in_a_pickle_is_never_run(tmp_path):
    marker = str(tmp_path / "pwned")
    data = pickle.dumps(Exploit(marker))
    pickle.loads(data)  # the control: an ordinary unpickler runs it
    assert os.path.exists(marker)
    os.unlink(marker)
    out = safe_record(data)
    assert not os.path.exists(marker)
    assert "not a plain log record" in out.getMessage()
    assert "subprocess.call is not allowed" in out.getMessage()


def test_a_record_smuggling_an_object_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    rec = logging.makeLogRecord({"msg": "hi", "args": None})
    rec.extra = Exploit(marker)  # a LogRecord, but carrying something else
    out = safe_record(pickle.dumps(rec))
    assert not os.path.exists(marker)
    assert "not allowed" in out.getMessage()


def test_other_objects_and_garbage_become_a_warning():
    for data in (pickle.dumps({"msg": "a dict"}), b"\x80\x05garbage", b""):
        out = safe_record(data)
        assert out.levelno == logging.WARNING
        assert "not a plain log record" in out.getMessage()


def test_oversized_and_odd_fields():
    assert "bytes" in safe_record(b"x" * (MAX_PICKLE + 1)).getMessage()
    rec = logging.makeLogRecord({"msg": "%s", "args": None, "levelno": 99, "lineno": "7"})
    out = safe_record(pickle.dumps(rec))
    assert (out.levelno, out.lineno) == (logging.WARNING, None)  # coerced, not trusted


ROUTES = r"""
import logging, multiprocessing, sys, threading, time
from agent import mp_logging

seen = []
class Capture(logging.Handler):
    def emit(self, record):
        seen.append((record.getMessage(), threading.current_thread().name))

root = logging.getLogger()
root.handlers[:] = [Capture()]
root.setLevel(logging.INFO)
mp_logging.install()
mp_logging.start_receivers()

def frontend():
    mp_logging.use_queue()
    logging.getLogger("frontend").info("from the frontend")

logging.getLogger("engine").info("from the engine")
p = multiprocessing.Process(target=frontend)
p.start()
p.join()
deadline = time.monotonic() + 10
while len(seen) < 2 and time.monotonic() < deadline:
    time.sleep(0.01)
print(repr(seen))
"""


HELD = """
import logging, threading
from agent import mp_logging

logging.getLogger().handlers[:] = [logging.StreamHandler()]
before = threading.active_count()
mp_logging.install()
held = threading.active_count()
mp_logging.start_receivers()
print(before, held, threading.active_count())
"""


def test_install_starts_no_thread_until_told():
    """Capabilities belong to threads: the receiver thread must not start before the engine
    has dropped its last one (agent/engine/privdrop.py), so install() holds it back."""
    out = subprocess.run([sys.executable, "-c", HELD], capture_output=True, text=True,
                         timeout=60, cwd=REPO, check=True)
    before, held, started = map(int, out.stdout.split())
    assert held == before
    assert started == before + 1


def test_only_the_frontend_s_records_take_the_queue():
    """The engine's own record is handled at once, in its own thread; the frontend's arrives
    through the queue's receiver thread."""
    out = subprocess.run([sys.executable, "-c", ROUTES], capture_output=True, text=True,
                         timeout=60, cwd=REPO, check=True)
    seen = ast.literal_eval(out.stdout.strip())
    assert seen[0] == ("from the engine", "MainThread")
    assert seen[1][0] == "from the frontend"
    assert seen[1][1].startswith("mp-handler-")
