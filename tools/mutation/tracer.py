"""Which test runs which line of the mutated modules, in every process a test starts.

The coverage copy's `privileged` and `agent` packages import a tracer first
thing (as the guard is imported): sys.settrace, threading.settrace and a
start_new_thread that sets it in threads started without threading, with a
local tracer only for frames of the target modules, recording (test, file,
line).  The test is the one pytest is running (trace_plugin.py tells the
tracer, and writes it to a file that subprocesses read when they start): the
root child, the daemon, and any helper process count for the test that
started them.  A process other than pytest's appends each line to its own
file the first time it runs it for its test (a few hundred writes per
process), so a child a test kills has lost nothing; pytest's process writes
after each test.  Where to write: one descriptor each process opens at start
(close-on-exec), so that the daemon can still write after its chroot and
under its seccomp filter, and the root child under Landlock, which lets it
open nothing for writing.  tests/helpers.py's descriptors() leaves that
descriptor out; a test that counts a process's descriptors otherwise finds
one more than it expects, fails traced, and is taken as incomplete (below).
A process forked by one of ours (the frontend, the thaw guard) keeps tracing
and writes through the descriptor it inherited, for the test of the process
that forked it (os.closerange, with which the guard closes every descriptor
but its link, leaves that one open); one forked in pytest's process
(multiprocessing in tests) writes nothing.

A module run from a copy of our packages that a test made (tests/test_integrity.py
installs one and tampers with it) counts as the module itself: the copy is
of the tree under test, mutant included.

Lines at import are attributed to the test running when the module was
imported (in pytest's process that is collection, "-"), so mutants at import
are mapped by module, not by line (testmap.py).

Tracing slows the traced code down several times, which some tests notice
(the hostile parent's timing invariants; the descriptor counts, which the
tracer's own descriptor changes).  They fail in the coverage run, are run
again untraced (runner.py), and their lines are taken as incomplete: such a
test is run for every mutant of every module it was seen to run anything of.
"""

from __future__ import annotations

import os

MODULE = "_mutation_trace"
IMPORT_LINE = f"import privileged.{MODULE}  # line coverage of the mutation run\n"
COLLECTION = "-"

_SOURCE = '''\
"""Line tracer for a mutation run (tools/mutation/tracer.py): not part of the product."""
import atexit as _atexit
import os as _os
import sys as _sys
import _thread
import threading as _threading
import time as _time

ROOT = {root!r}
TARGETS = frozenset({targets!r})
OUT = {out!r}
CURRENT = {current!r}
PID = _os.getpid()
IN_PYTEST = "pytest" in _sys.modules  # flushed by the plugin after each test

_names = {{}}
_seen = set()
_new = []
_state = {{"test": "-", "fd": None}}


def _test_at_start():
    try:
        with open(CURRENT, encoding="utf-8") as f:
            return f.read().strip() or "-"
    except OSError:
        return "-"


def set_test(name):
    _state["test"] = name or "-"
    try:
        with open(CURRENT + ".new", "w", encoding="utf-8") as f:
            f.write(name or "-")
        _os.replace(CURRENT + ".new", CURRENT)
    except OSError:
        pass


def _rel(filename):
    rel = _names.get(filename, 0)
    if rel == 0:
        path = filename if filename.startswith("/") else _os.path.join(ROOT, filename)
        rel = path[len(ROOT) + 1:] if path.startswith(ROOT + "/") else None
        if rel not in TARGETS:
            # a copy of our packages a test made elsewhere (an install it tampers with)
            rel = next((t for t in TARGETS if path.endswith("/" + t)), None)
        _names[filename] = rel
    return rel


def flush():
    if IN_PYTEST and _os.getpid() != PID:  # a fork in a test: its test is not known here
        _new.clear()
        return
    if not _new:
        return
    text = "".join("%s\\t%s\\t%d\\n" % hit for hit in _new).encode()
    _new.clear()
    fd = _state["fd"]
    try:
        if fd is None:
            fd = _os.open(OUT, _os.O_WRONLY | _os.O_APPEND | _os.O_CREAT | _os.O_CLOEXEC, 0o600)
            try:
                _os.write(fd, text)
            finally:
                _os.close(fd)
        else:
            _os.write(fd, text)
    except OSError:
        pass


def _hit(rel, line):
    key = (_state["test"], rel, line)
    if key not in _seen:
        _seen.add(key)
        _new.append(key)
        if not IN_PYTEST:
            flush()


def _global(frame, event, arg):
    # Called for every Python call while tracing: as little work as can be.
    try:
        filename = frame.f_code.co_filename
        rel = _names[filename] if filename in _names else _rel(filename)
        if rel is None:
            return None
        test = _state["test"]
        _hit(rel, frame.f_lineno)
    except Exception:  # noqa: BLE001 - at interpreter exit the globals are gone
        return None

    def local(frame, event, arg):
        if event == "line" and (test, rel, frame.f_lineno) not in _seen:
            try:
                _hit(rel, frame.f_lineno)
            except Exception:  # noqa: BLE001
                return None
        return local

    return local


_closerange_of_os = _os.closerange


def _closerange(low, high):
    # The thaw guard closes every descriptor but its link: this one stays, to trace it.
    fd = _state["fd"]
    if fd is not None and low <= fd < high:
        _closerange_of_os(low, fd)
        _closerange_of_os(fd + 1, high)
    else:
        _closerange_of_os(low, high)


def _start():
    _state["test"] = _test_at_start()
    try:
        _state["fd"] = _os.open(OUT, _os.O_WRONLY | _os.O_APPEND | _os.O_CREAT
                                | _os.O_CLOEXEC, 0o600)
    except OSError:
        pass
    _atexit.register(flush)
    _threading.settrace(_global)
    _sys.settrace(_global)
    _thread.start_new_thread = _traced_start  # privileged/concurrent.py starts its own
    _os.closerange = _closerange


def _traced_start(function, args, kwargs=None, _start=_thread.start_new_thread):
    def run(*a, **k):
        _sys.settrace(_global)
        return function(*a, **k)
    return _start(run, args, kwargs or {{}})


if not getattr(_sys, "_mutation_traced", False):
    _sys._mutation_traced = True
    OUT = _os.path.join(OUT, "%d-%d.tsv" % (PID, _time.time_ns()))
    _start()
'''


def source(root: str, targets: list[str], outdir: str) -> str:
    return _SOURCE.format(root=os.path.abspath(root), targets=sorted(targets), out=outdir,
                          current=os.path.join(outdir, "current"))


def install(tree: str, targets: list[str], outdir: str) -> None:
    """Write the tracer into the copy at `tree`, imported first by each package."""
    from tools.mutation import guard

    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(tree, "privileged", MODULE + ".py"), "w", encoding="utf-8") as f:
        f.write(source(tree, targets, outdir))
    for package in guard.PACKAGES:
        init = os.path.join(tree, package, "__init__.py")
        with open(init, "rb") as f:
            text = f.read()
        if IMPORT_LINE.encode() not in text:
            with open(init, "wb") as f:
                f.write(guard.with_import(text, IMPORT_LINE))


def read(outdir: str) -> set[tuple[str, str, int]]:
    """Every (test, file, line) the processes wrote."""
    hits: set[tuple[str, str, int]] = set()
    for name in os.listdir(outdir):
        if not name.endswith(".tsv"):
            continue
        with open(os.path.join(outdir, name), encoding="utf-8", errors="replace") as f:
            for row in f:
                parts = row.rstrip("\n").split("\t")
                if len(parts) == 3 and parts[2].isdigit():
                    hits.add((parts[0], parts[1], int(parts[2])))
    return hits
