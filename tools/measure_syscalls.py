"""Measure the syscalls the agent really makes once sandboxed (strace -f, as root).

    python -m tools.measure_syscalls        # or: make syscalls

Runs the real agent (parent and root child) against the simulator on a
scratch ext4 filesystem of its own, under strace -f, with both seccomp
filters replaced by allow-everything filters: the seccomp() call still
happens where the real filter would be loaded, so every syscall a process
makes after its own seccomp() is one its filter must allow.  Three runs
cover what the daemon does in service:

  foreground  stderr logging: CHECK, FREEZE, THAW; SIGSTOP and SIGCONT while
              frozen; the watchdog's thaw and the late THAW; the kernel's fake
              THAW (hibernation) and a dropped channel, each followed by REOPEN;
              SIGTERM to the parent (QUIT to the child)
  daemon      daemon mode (double fork) and syslog: a cycle; syslog goes away
              (SysLogHandler reconnects); SIGTERM to the child while frozen (its
              signal path), and the parent's exit when its child is gone
  stop-frozen SIGTERM to the parent while frozen (the link is closed: the
              child thaws on EOF)
  frontend    [notify], [control] and [metrics]: a subscriber answering every
              event, a status request, SIGSTOP/SIGCONT, cycles, SIGTERM; the
              parent then also runs multiprocessing-logging's threads and
              writes the metrics file, and the frontend process has its own
              filter

It prints, per role, each syscall and how often it was made, and compares
with the policies (privileged/sandbox.py, agent/sandbox_linux.py): what was
made but is not allowed is a bug in the allowlist.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psutil

from agent.clients import status as status_client
from agent.clients.notify import AgentGone, Subscription
from agent.dev import scratch
from agent.sandbox import parent_roles
from agent.sandbox_linux import FRONTEND, parent_policy
from agent.simulator.server import Simulator
from privileged import seccomp
from privileged.sandbox import child_policy
from privileged.syscall_table import SYSCALLS
from tests.helpers import REPO, write_config

ALLOW_ALL = "import privileged.seccomp as s; s.compile_policy = lambda p, a: [(6, 0, 0, s.ALLOW)]"

# The parent, started so that both filters are allow-all; everything else is the real agent.
PARENT = f"""
import sys
sys.path.insert(0, {REPO!r})
{ALLOW_ALL}
import agent.engine.child_start as start
_bootstrap = start.child_bootstrap
start.child_bootstrap = lambda: _bootstrap(
    "{ALLOW_ALL}; from privileged.child import main; sys.exit(main())")
from agent.cli import main
sys.exit(main(sys.argv[1:]))
"""

_LINE = re.compile(r"^(\d+) +(?:<\.\.\. )?([a-z_0-9]+)(\(| resumed>)")
_RETURNED = re.compile(r"= (\d+)$")
_CLONES = ("clone", "clone3", "fork", "vfork")


@dataclass
class Trace:
    """Syscalls per role after the process's own seccomp() call (TSYNC: its threads'
    too), and every syscall any process made from exec on (what a unit's
    SystemCallFilter must allow).  Roles: "child", "thaw guard", "frontend", and
    "parent[<roles>]" with the roles its filter was built from."""

    calls: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))
    everything: set[str] = field(default_factory=set)

    def add(self, path: str, parent_roles: tuple[str, ...]) -> None:
        # Two passes: a new thread's first calls are printed before its creator's clone
        # returns, so which process a thread belongs to is known only at the end.
        calls: list[tuple[int, str, str]] = []  # (line, thread id, syscall)
        leader: dict[str, str] = {}  # thread id -> the thread that created it (CLONE_THREAD)
        forked_by: dict[str, str] = {}  # process -> the thread that forked it
        role: dict[str, str] = {}  # process -> "child" (exec'd -S) or "parent" (chroot)
        confined_at: dict[str, int] = {}  # thread id -> line of its seccomp()
        cloning: dict[str, bool] = {}  # thread id -> its clone in progress makes a thread
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f):
                m = _LINE.match(line)
                if not m:
                    continue
                tid, name, how = m.groups()
                if how == "(":
                    self.everything.add(name)
                    calls.append((n, tid, name))
                    if name == "execve" and '"-I", "-B", "-S"' in line:
                        role[tid] = "child"
                    elif name == "chroot":
                        role[tid] = "parent"
                    elif name == "seccomp":
                        confined_at.setdefault(tid, n)
                    if name in _CLONES:
                        cloning[tid] = "CLONE_THREAD" in line
                if name in _CLONES and tid in cloning and (r := _RETURNED.search(line.rstrip())):
                    (leader if cloning.pop(tid) else forked_by)[r.group(1)] = tid

        def process(tid: str) -> str:
            while tid in leader:
                tid = leader[tid]
            return tid

        def label(proc: str) -> str:
            r = role.get(proc)
            forker = role.get(process(forked_by[proc])) if proc in forked_by else None
            if r is None and forker == "parent":
                return "frontend"  # forked by the parent, never exec'd
            if r is None and forker == "child":
                return "thaw guard"  # forked by the child, under the child's own filter
            return f"parent[{'+'.join(parent_roles)}]" if r == "parent" else r or "?"

        start: dict[str, int] = {}
        for tid, n in confined_at.items():
            start[process(tid)] = min(n, start.get(process(tid), n))
        for n, tid, name in calls:
            proc = process(tid)
            if proc in start and n > start[proc]:
                self.calls[label(proc)][name] += 1


def _agent_argv(config: str, device: str, foreground: bool) -> list[str]:
    argv = ["strace", "-f", "-qq", "-o", "TRACE", sys.executable, "-c", PARENT,
            "--config", config, "--device", device, "-d"]
    return [*argv, "-n"] if foreground else argv


def _pid_of(pattern: Callable[[list[str]], bool], timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if pattern(p.info["cmdline"] or []) and p.uids().real != 0:
                    return int(p.pid)
        time.sleep(0.05)
    raise TimeoutError("the agent did not show up")


@dataclass
class Scene:
    sim: Simulator
    parent: int
    syslog: socket.socket
    run: str

    def subscriber(self) -> threading.Thread:
        """A subscriber that answers every event; it ends when the agent goes away."""
        sub = Subscription(os.path.join(self.run, "notify.sock"), "measure")

        def serve() -> None:
            with contextlib.suppress(AgentGone, OSError):
                sub.serve()
            sub.close()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        return t

    def syslog_goes_away(self) -> None:
        self.syslog.shutdown(socket.SHUT_RDWR)  # wakes the drain thread
        self.syslog.close()


@contextlib.contextmanager
def _scene(work: str, name: str, fss: list[scratch.ScratchFS], trace: Trace, *,
           foreground: bool = True,
           frontend: bool = False, metrics: bool = False) -> Iterator[Scene]:
    """One traced run of the agent."""
    run = os.path.join(work, name)
    os.makedirs(run, mode=0o755)
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind(os.path.join(run, "log.sock"))
    # Read and drop: a full datagram queue would block the daemon's next log line.
    threading.Thread(target=_drain, args=(syslog,), daemon=True).start()
    metrics_dir = os.path.join(run, "metrics")
    os.mkdir(metrics_dir, 0o755)
    os.chown(metrics_dir, pwd.getpwnam("hvvss").pw_uid, -1)
    config = write_config(os.path.join(run, "agent.toml"), [fs.mountpoint for fs in fss], run,
                          max_frozen=1.0,
                          extra=f'[log]\nsyslog_socket = "{run}/log.sock"\n',
                          frontend=frontend, metrics={"dir": metrics_dir} if metrics else None)
    sim = Simulator(os.path.join(run, "vss.sock"), util_timeout=2.0).start()
    out = os.path.join(run, "trace")
    argv = [out if a == "TRACE" else a for a in _agent_argv(config, sim.path, foreground)]
    with open(os.path.join(run, "stderr"), "wb") as err:
        strace = subprocess.Popen(argv, cwd="/", stdout=subprocess.DEVNULL, stderr=err)
    try:
        parent = _pid_of(lambda argv: config in argv and "strace" not in argv)
        sim.wait_registered(30)
        yield Scene(sim, parent, syslog, run)
        strace.wait(30)
    finally:
        if strace.poll() is None:
            strace.kill()
        sim.stop()
        syslog.close()
        for fs in fss:
            scratch.thaw(fs.mountpoint)
    trace.add(out, parent_roles(frontend=frontend, metrics=metrics))


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while sock.recv(65536):
            pass


def _stop_and_continue(parent: int) -> None:
    """SIGSTOP and SIGCONT the parent and the child (a debugger, a frozen cgroup)."""
    for p in (psutil.Process(parent), *psutil.Process(parent).children()):
        p.suspend()
        time.sleep(0.1)
        p.resume()


def _cycle(sim: Simulator) -> None:
    for op in ("check", "freeze", "thaw"):
        sim.request(op, timeout=20)


def measure(work: str) -> Trace:
    trace = Trace()
    # Two filesystems: the child freezes them from worker threads (privileged/concurrent.py).
    with scratch.filesystems(work, ["ext4", "ext4"]) as fss:
        with _scene(work, "foreground", fss, trace) as scene:
            sim = scene.sim
            scratch.leave_dirty(fss[0].mountpoint, 4)  # so that FREEZE flushes (PRESYNC_MIN_KB)
            _cycle(sim)
            time.sleep(0.2)
            sim.request("freeze", timeout=20)
            _stop_and_continue(scene.parent)  # interrupted waits resume by restart_syscall
            time.sleep(1.5)  # the watchdog thaws
            sim.request("thaw", timeout=20)
            time.sleep(0.2)
            sim.request("freeze", timeout=20)
            sim.hibernate()  # the kernel's fake THAW: the reply fails, REOPEN
            sim.wait_registered(30, connections=2)
            sim.drop_connection()
            sim.wait_registered(30, connections=3)
            time.sleep(0.2)
            _cycle(sim)
            os.kill(scene.parent, signal.SIGTERM)
        with _scene(work, "daemon", fss, trace, foreground=False) as scene:
            _cycle(scene.sim)
            scene.syslog_goes_away()  # SysLogHandler then reconnects at each record
            scene.sim.request("check", timeout=20)
            time.sleep(0.2)
            scene.sim.request("freeze", timeout=20)
            (child,) = psutil.Process(scene.parent).children()
            child.send_signal(signal.SIGTERM)  # the child's signal path, then the parent's
        with _scene(work, "stop-frozen", fss, trace) as scene:
            scene.sim.request("freeze", timeout=20)
            os.kill(scene.parent, signal.SIGTERM)
        with _scene(work, "frontend", fss, trace, frontend=True, metrics=True) as scene:
            subscriber = scene.subscriber()
            _cycle(scene.sim)
            status_client.fetch(os.path.join(scene.run, "control.sock"))
            _stop_and_continue(scene.parent)
            _cycle(scene.sim)
            os.kill(scene.parent, signal.SIGTERM)
        subscriber.join(10)
    return trace


def report(trace: Trace) -> list[str]:
    """The measured sets, and every syscall made that a policy does not allow."""
    arch = seccomp.native_arch()
    lines, problems = [], []
    for label, calls in sorted(trace.calls.items()):
        policy = _policy_of(label)
        allowed = policy.allowed()
        lines.append(f"{label}: {len(calls)} syscalls after seccomp()")
        lines += [f"  {name:16} {n:6}" for name, n in sorted(calls.items())]
        unused = sorted(n for n in allowed if n not in calls and n in SYSCALLS[arch])
        lines.append(f"  allowed, not seen here: {', '.join(unused) or 'none'}")
        answered = sorted(n for n in calls if n in policy.names() and n not in allowed)
        if answered:  # a Refuse rule: the caller copes with the errno (see its reason)
            lines.append(f"  answered with an errno: {', '.join(answered)}")
        problems += [f"{label}: {name} made but not allowed" for name in sorted(calls)
                     if name not in policy.names()]
    return lines + (problems or ["every syscall made is allowed"])


def _policy_of(label: str) -> seccomp.Policy:
    if label in ("child", "thaw guard"):
        # measured against the simulator, whose socket REOPEN reopens, under Landlock
        return child_policy(simulated=True, landlock=True)
    if label == "frontend":
        return FRONTEND
    roles = tuple(label.removeprefix("parent[").removesuffix("]").split("+"))
    return parent_policy(roles)


def main(argv: list[str]) -> int:
    """`argv`: optionally a directory to keep the traces in."""
    if os.geteuid() != 0:
        sys.stderr.write("measure_syscalls: run as root (it makes and freezes a scratch "
                         "filesystem)\n")
        return 2
    work = argv[0] if argv else tempfile.mkdtemp(prefix="hvvss-syscalls-")
    os.makedirs(work, mode=0o755, exist_ok=True)
    try:
        for line in report(measure(work)):
            print(line)
    finally:
        if not argv:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
