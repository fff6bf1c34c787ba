"""Copies of the tree, the coverage run, the workers, timeouts and clean-up.

Everything runs in copies under one directory in /tmp (mode 0755, so the
unprivileged users the tests run as can reach their sockets; short names, as
a Unix socket's path must fit in 108 bytes), never in the worktree: one copy
for the coverage run, one per worker.  Each copy has a virtualenv of its own
(make_venv), the freeze guard (guard.py) and TMPDIR pointing at its own scratch directory,
which is where the tests make their filesystems and the only place the guard
lets anything be frozen.

A mutant: write the mutated module into the worker's copy (with a fresh
mtime, so that no stale bytecode of the previous mutant is used), run pytest
-x on the mutant's tests in a new session, restore the module.  Past its
budget the session is stopped (SIGTERM, then SIGKILL: the root child thaws on
SIGTERM).  After every mutant, whatever the tests left under the worker's
scratch directory is undone: processes that name it, filesystems (thawed,
then unmounted), loop devices backed by files there, files.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import queue
import re
import shutil
import signal
import site
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tools.mutation import guard, tracer
from tools.mutation.mutants import Mutant
from tools.mutation.results import ERROR, KILLED, SURVIVED, TIMEOUT, Results
from tools.mutation.testmap import IGNORED_FILES, CoverageMap

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FITHAW = 0xC0045878
# pyproject.toml's dependencies, which our processes started with -S import: the daemon
# multiprocessing_logging, the clients and the demo psutil.
DAEMON_IMPORTS = ("multiprocessing_logging", "psutil")
_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)
_REFUSED = re.compile(r"mutation guard refused FI(?:FREEZE|THAW): [^)\n]*")


class RunError(Exception):
    """The run cannot go on (one line for the user)."""


# --- the tree and its copies ------------------------------------------------------------


def tree_files(top: str = TOP) -> list[str]:
    """The files of the worktree: tracked, and new ones git does not ignore."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=top, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise RunError(f"cannot list the files of {top} with git: {e}") from None
    names = [n for n in out.stdout.decode().split("\0") if n]
    return sorted(n for n in names if os.path.isfile(os.path.join(top, n)))


def make_copy(dest: str, files: Iterable[str], top: str = TOP) -> None:
    for rel in files:
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        shutil.copy2(os.path.join(top, rel), target)


def make_venv(dest: str, tree: str) -> None:
    """An interpreter whose imports of ours come from `tree`, whatever runs it.

    The tests start the daemon as `python -I -m agent`: with -I the current directory is
    not on sys.path, and the worktree's virtualenv would import the worktree's code (its
    editable install), unmutated and unguarded.  This virtualenv has no editable install:
    a .pth puts the copy first, then the worktree's site-packages for the dependencies
    (a directory named in a .pth is added as it is: the .pth files in it are not run)."""
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", dest], check=True,
                       capture_output=True, timeout=120)
        out = subprocess.run([os.path.join(dest, "bin", "python"), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise RunError(f"cannot make a virtualenv for the copy at {dest}: {e}") from None
    deps = [p for p in site.getsitepackages() if os.path.isdir(p)]
    purelib = out.stdout.strip()
    with open(os.path.join(purelib, "_mutation_copy.pth"), "w", encoding="utf-8") as f:
        f.write("\n".join([tree, *deps]) + "\n")
    # The daemon starts with -S and, once unprivileged, adds this site-packages without
    # running its .pth files: the packages it imports then must be in it themselves.
    for name in DAEMON_IMPORTS:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise RunError(f"{name}, which our processes import, is not installed")
        if spec.submodule_search_locations:
            source = os.path.dirname(spec.origin)
            shutil.copytree(source, os.path.join(purelib, os.path.basename(source)),
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(spec.origin, purelib)


@dataclass
class Copy:
    """A copy of the tree with the guard, and the scratch directory its tests use."""

    root: str
    sources: dict[str, bytes] = field(default_factory=dict)  # module -> unmutated source
    writes: int = 0
    session: int | None = None  # the pytest session running in it, if any

    @property
    def tree(self) -> str:
        return os.path.join(self.root, "tree")

    @property
    def tmp(self) -> str:
        return os.path.join(self.root, "t")

    @property
    def guard_log(self) -> str:
        return os.path.join(self.root, "guard.log")

    @property
    def python(self) -> str:
        return os.path.join(self.root, "venv", "bin", "python")

    def create(self, files: list[str], modules: list[str]) -> Copy:
        os.makedirs(self.tmp, mode=0o755)
        for d in (self.root, self.tmp):  # the tests' other users reach their sockets below
            os.chmod(d, 0o755)  # noqa: S103
        make_copy(self.tree, files)
        guard.install(self.tree, self.tmp, self.guard_log)
        make_venv(os.path.join(self.root, "venv"), self.tree)
        for m in modules:
            with open(os.path.join(TOP, m), "rb") as f:
                self.sources[m] = f.read()
        return self

    def write(self, module: str, data: bytes) -> None:
        """Put `data` in place of `module`, the guard's import kept, with an mtime no
        earlier version had (bytecode is checked against the source's mtime and size)."""
        package = module.split("/", maxsplit=1)[0]
        if module == f"{package}/__init__.py" and package in guard.PACKAGES:
            data = guard.with_import(data)
        path = os.path.join(self.tree, module)
        with open(path, "wb") as f:
            f.write(data)
        self.writes += 1
        stamp = int(time.time()) + 10 * self.writes
        os.utime(path, (stamp, stamp))
        cache = os.path.join(os.path.dirname(path), "__pycache__")
        stem = os.path.splitext(os.path.basename(path))[0] + "."
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(cache):
                if name.startswith(stem):
                    os.unlink(os.path.join(cache, name))

    def mutate(self, m: Mutant) -> None:
        self.write(m.path, m.apply(self.sources[m.path]))

    def restore(self, m: Mutant) -> None:
        self.write(m.path, self.sources[m.path])


def check_copy(copy: Copy) -> None:
    """The copy's code is what runs (not the worktree's, through the editable install),
    in pytest's interpreter, in one started as the daemon is (-I, from elsewhere) and in
    one started as the root child is; the guard is on in each and refuses the root
    filesystem (asked, never tried)."""
    probe = ("import os, sys{path}; import privileged.child, agent, fcntl; "
             "from privileged import _mutation_guard as g; "
             "fd = os.open('/', os.O_RDONLY | os.O_DIRECTORY); "
             "print(privileged.child.__file__, agent.__file__, "
             "getattr(fcntl, '_mutation_guarded', False), g.refusal(fd) is not None)")
    for flags, path in (((), ""), (("-I",), ""),
                        (("-I", "-B", "-S"), f"; sys.path.insert(0, {copy.tree!r})")):
        out = subprocess.run([copy.python, *flags, "-c", probe.format(path=path)],
                             cwd="/" if "-I" in flags else copy.tree, capture_output=True,
                             text=True, timeout=60, check=False, env=_env(copy))
        words = out.stdout.split()
        if out.returncode != 0 or len(words) != 4:
            raise RunError(f"the copy at {copy.tree} does not start: {out.stderr.strip()}")
        child, agent, guarded, refuses_root = words
        if not (child.startswith(copy.tree + "/") and agent.startswith(copy.tree + "/")):
            raise RunError(f"the copy imports {child} and {agent}, not its own code")
        if guarded != "True" or refuses_root != "True":
            raise RunError(f"the freeze guard is not on in the copy at {copy.tree}")


def _env(copy: Copy) -> dict[str, str]:
    env = dict(os.environ, TMPDIR=copy.tmp, PYTHONDONTWRITEBYTECODE="1")
    for var in ("PYTEST_ADDOPTS", "PYTHONPATH", "COVERAGE_PROCESS_START"):
        env.pop(var, None)
    return env


# --- one pytest session -----------------------------------------------------------------


@dataclass
class Outcome:
    code: int | None  # None: stopped past its budget
    output: str
    seconds: float


def pytest(copy: Copy, args: list[str], budget: float,
           stdout: int | None = subprocess.PIPE) -> Outcome:
    """pytest in `copy`, in a session of its own, stopped past `budget` seconds; then
    everything the tests left in the copy's scratch directory is undone."""
    start = time.monotonic()
    proc = subprocess.Popen([copy.python, "-m", "pytest", "-p", "no:cacheprovider", *args],
                            cwd=copy.tree, env=_env(copy), stdout=stdout,
                            stderr=subprocess.STDOUT, start_new_session=True)
    copy.session = proc.pid
    try:
        out, _ = proc.communicate(timeout=budget)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        stop_session(proc.pid, copy.tmp)
        out, _ = proc.communicate()
        code = None
    finally:
        stop_session(proc.pid, copy.tmp)
        undo_scratch(copy.tmp)
        copy.session = None
    text = out.decode(errors="replace") if out else ""
    return Outcome(code, text, time.monotonic() - start)


def _ours(session: int, scratch: str) -> list[int]:
    """Processes the session started (same session or group), or that name its scratch
    directory (a daemon that detached itself)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        pgrp, sid = int(stat[2]), int(stat[3])
        if session in (pgrp, sid) or scratch.encode() + b"/" in cmdline:
            pids.append(int(name))
    return pids


def stop_session(session: int, scratch: str, grace: float = 5.0) -> None:
    """SIGTERM (the root child thaws on it), then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _ours(session, scratch)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _ours(session, scratch):
            time.sleep(0.1)


def _mounts_under(scratch: str) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        points = [_unescape(line.split(" ")[4]) for line in f]
    return sorted({p for p in points if p.startswith(scratch + "/")}, key=len, reverse=True)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda g: chr(int(g.group(1), 8)), field)


def undo_scratch(scratch: str) -> None:
    """Thaw and unmount every filesystem under `scratch`, detach the loop devices backed
    there, remove the files; nothing outside `scratch` is touched."""
    from agent.dev import scratch as scratch_fs

    for point in _mounts_under(scratch):
        with contextlib.suppress(OSError):
            while scratch_fs.thaw(point):
                pass
        if subprocess.run(["umount", point], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    out = subprocess.run(["losetup", "--list", "--noheadings", "--raw", "--output",
                          "NAME,BACK-FILE"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and _unescape(parts[1]).startswith(scratch + "/"):
            subprocess.run(["losetup", "-d", parts[0]], capture_output=True, check=False)
    for name in os.listdir(scratch):
        path = os.path.join(scratch, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)


RCU_EXPEDITED = "/sys/kernel/rcu_expedited"


def rcu_expedited() -> str | None:
    """The kernel's setting: a test's agent with `[freeze] rcu_expedited` sets it while it
    freezes, and a child killed meanwhile leaves it to its successor's crash recovery,
    which a stopped run never starts.  None where the kernel has no such file."""
    try:
        with open(RCU_EXPEDITED, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def restore_rcu_expedited(value: str | None) -> None:
    """Back to `value` (read before the run) if a mutant's run left it otherwise: only when
    no test runs, since a test in another copy may hold it at 1 on purpose."""
    if value is not None and rcu_expedited() != value:
        with contextlib.suppress(OSError), open(RCU_EXPEDITED, "w", encoding="ascii") as f:
            f.write(value)


# --- the coverage run -------------------------------------------------------------------


def coverage_run(base: str, files: list[str], modules: list[str], *, with_slow: bool,
                 plain: Copy, say: Callable[[str], None],
                 only: list[str] | None = None) -> CoverageMap:
    """The whole suite (or the test files `only`) once, traced, in a copy of its own; then
    the tests that failed are run again untraced in `plain` (a worker's copy, not mutated
    yet): those that still fail are not used."""
    copy = Copy(os.path.join(base, "c")).create(files, modules)
    out = os.path.join(copy.root, "trace")
    tracer.install(copy.tree, modules, out)
    check_copy(copy)
    say(f"coverage run: {'the whole suite' if only is None else ' '.join(only)}, traced, "
        f"in {copy.tree} (progress below)")
    args = ["-q", "-p", "tools.mutation.trace_plugin", "-o", "addopts=", *(only or []),
            *(f"--ignore={f}" for f in IGNORED_FILES)]
    if not with_slow:
        args += ["-m", "not slow"]
    result = pytest(copy, args, budget=4 * 3600, stdout=None)
    if result.code is None or not os.path.exists(os.path.join(out, "tests.json")):
        raise RunError("the coverage run did not finish")
    import json

    with open(os.path.join(out, "tests.json"), encoding="utf-8") as f:
        tests = json.load(f)
    tmap = CoverageMap.build(tracer.read(out), tests, copy.tree, modules)
    tmap.with_slow = with_slow
    failed = sorted(t for t, info in tests.items() if info.get("failed"))
    if failed:
        say(f"{len(failed)} test(s) failed traced; running them again untraced")
        again = pytest(plain, ["-q", "-rfE", "-o", "addopts=", *failed], budget=3600)
        still = set(_FAILED.findall(again.output))
        for t in failed:
            if t in still or again.code is None:
                tmap.broken[t] = "fails on the unmutated copy"
    shutil.rmtree(copy.root, ignore_errors=True)
    return tmap


# --- the workers --------------------------------------------------------------------------


@dataclass
class Job:
    mutant: Mutant
    source_hash: str
    context_hash: str


def judge(copy: Copy, job: Job, tmap: CoverageMap,
          killers: Mapping[str, int] | None = None) -> dict[str, Any]:
    m = job.mutant
    tests = tmap.tests_for(m, killers)
    record: dict[str, Any] = {
        "id": m.id, "path": m.path, "line": m.line, "kind": m.kind,
        "description": m.description, "source_hash": job.source_hash,
        "context_hash": job.context_hash, "tests": len(tests),
        "covered": bool(tests) and (m.at_import or tmap.covered(m)),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if not tests:
        record.update(verdict=SURVIVED, seconds=0.0, detail="no test runs it")
        return record
    with contextlib.suppress(FileNotFoundError):
        os.unlink(copy.guard_log)
    copy.mutate(m)
    try:
        args = ["-x", "-q", "-rfE", "--no-header", "-o", "addopts="]
        outcome = pytest(copy, [*args, *tests], budget=tmap.budget(tests))
        if outcome.code == 4 and "not found:" in outcome.output and \
                not _FAILED.findall(outcome.output) and unparametrized(tests) != tests:
            # A parametrized test's id made from the mutated value (bytes of a record, say)
            # is not there to find under the mutant: ask for the functions instead.
            outcome = pytest(copy, [*args, *unparametrized(tests)], budget=tmap.budget(tests))
    finally:
        copy.restore(m)
    record["seconds"] = round(outcome.seconds, 1)
    refused: list[str] = []
    with contextlib.suppress(FileNotFoundError), open(copy.guard_log, encoding="utf-8") as f:
        refused = f.read().splitlines()
    # The root child cannot write the guard's log (Landlock, its filter): its refusals
    # show in its own log lines, in pytest's output when a test fails.
    refused += sorted(set(_REFUSED.findall(outcome.output)))
    if refused:
        record["guard"] = refused[:5]
    record.update(verdict_of(outcome))
    return record


def unparametrized(tests: list[str]) -> list[str]:
    """The test ids with their parameters dropped, each function once, in order."""
    return list(dict.fromkeys(t.split("[", 1)[0] for t in tests))


def verdict_of(outcome: Outcome) -> dict[str, str]:
    failed = _FAILED.findall(outcome.output)
    if outcome.code is None:
        return {"verdict": TIMEOUT}
    if outcome.code == 0:
        return {"verdict": SURVIVED}
    if outcome.code in (1, 2, 3) or (outcome.code == 4 and failed):
        # tests failed; interrupted (an import error); internal error; or a test module
        # that no longer imports (pytest then finds none of its tests: exit 4)
        return {"verdict": KILLED, "killed_by": failed[0] if failed else f"exit {outcome.code}"}
    # 4 otherwise: usage; 5: no tests collected: the tool's mistake, not the mutant's
    return {"verdict": ERROR,
            "detail": f"pytest exit {outcome.code}: " + " ".join(outcome.output.split()[-30:])}


def run_workers(copies: list[Copy], jobs: list[Job], tmap: CoverageMap, results: Results,
                say: Callable[[str], None]) -> None:
    todo: queue.Queue[Job] = queue.Queue()
    for job in jobs:
        todo.put(job)
    done = 0
    started = time.monotonic()
    lock = threading.Lock()
    stop = threading.Event()
    killers: dict[str, Counter[str]] = defaultdict(Counter)  # module -> test -> kills
    for r in results.latest.values():
        if r.get("killed_by"):
            killers[r["path"]][r["killed_by"]] += 1

    def work(copy: Copy) -> None:
        nonlocal done
        while not stop.is_set():
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            with lock:
                ranked = dict(killers[job.mutant.path])
            record = judge(copy, job, tmap, ranked)
            if stop.is_set():
                return  # stopped by us, not by its tests: not a verdict
            results.add(record)
            with lock:
                if record.get("killed_by"):
                    killers[job.mutant.path][record["killed_by"]] += 1
                done += 1
                elapsed = time.monotonic() - started
                eta = elapsed / done * (len(jobs) - done)
                by = f", by {record['killed_by']}" if record.get("killed_by") else ""
                guarded = f"; guard refused: {record['guard'][0]}" if record.get("guard") else ""
                say(f"[{done}/{len(jobs)} {elapsed / 60:.0f} min, ~{eta / 60:.0f} min left] "
                    f"{record['verdict']:8} {job.mutant.path}:{job.mutant.line} "
                    f"{job.mutant.description} ({record['seconds']:.0f} s, "
                    f"{record['tests']} tests{by}){guarded}")

    threads = [threading.Thread(target=work, args=(c,), name=f"worker-{i}", daemon=True)
               for i, c in enumerate(copies)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(1.0)
    except KeyboardInterrupt:
        stop.set()
        say("interrupted: stopping the mutants in flight (the results so far are kept)")
        for c in copies:
            if c.session is not None:
                stop_session(c.session, c.tmp)
        for t in threads:
            t.join(60)
        raise
