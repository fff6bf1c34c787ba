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

It prints, per role, each syscall and how often it was made, and compares
with the policies (privileged/sandbox.py, agent/sandbox_linux.py): what was
made but is not allowed is a bug in the allowlist.
"""

from __future__ import annotations

import collections
import contextlib
import os
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

from agent import scratch
from agent.sandbox_linux import parent_policy
from agent.simulator.server import Simulator
from privileged import seccomp
from privileged.sandbox import ROOT_CHILD
from privileged.syscall_table import SYSCALLS
from tests.helpers import REPO, write_config

ALLOW_ALL = "import privileged.seccomp as s; s.compile_policy = lambda p, a: [(6, 0, 0, s.ALLOW)]"

# The parent, started so that both filters are allow-all; everything else is the real agent.
PARENT = f"""
import sys
sys.path.insert(0, {REPO!r})
{ALLOW_ALL}
import agent.child_link as link
link.child_bootstrap = lambda: (
    "import sys; sys.path.insert(0, {REPO!r}); {ALLOW_ALL}; "
    "from privileged.child import main; sys.exit(main())")
from agent.cli import main
sys.exit(main(sys.argv[1:]))
"""

_CALL = re.compile(r"^(\d+) +([a-z_0-9]+)\(")


@dataclass
class Trace:
    """Syscalls per process after that process's own seccomp() call, and every syscall
    any process made from its exec on (what a unit's SystemCallFilter must allow)."""

    calls: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))
    everything: set[str] = field(default_factory=set)

    def add(self, path: str) -> None:
        role: dict[str, str] = {}
        confined: set[str] = set()
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                m = _CALL.match(line)
                if not m:
                    continue
                pid, name = m.groups()
                self.everything.add(name)
                if name == "execve" and '"-I", "-B", "-S"' in line:
                    role[pid] = "child"
                elif name == "chroot":
                    role[pid] = "parent"
                if pid in confined:
                    self.calls[role.get(pid, "?")][name] += 1
                elif name == "seccomp" and pid in role:
                    confined.add(pid)


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

    def syslog_goes_away(self) -> None:
        self.syslog.shutdown(socket.SHUT_RDWR)  # wakes the drain thread
        self.syslog.close()


@contextlib.contextmanager
def _scene(work: str, name: str, fs: scratch.ScratchFS, foreground: bool,
           trace: Trace) -> Iterator[Scene]:
    """One traced run of the agent."""
    run = os.path.join(work, name)
    os.makedirs(run, mode=0o755)
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind(os.path.join(run, "log.sock"))
    # Read and drop: a full datagram queue would block the daemon's next log line.
    threading.Thread(target=_drain, args=(syslog,), daemon=True).start()
    config = write_config(os.path.join(run, "agent.toml"), [fs.mountpoint], run, max_frozen=1.0,
                          cooldown=0.1, extra=f'[log]\nsyslog_socket = "{run}/log.sock"\n')
    sim = Simulator(os.path.join(run, "vss.sock"), util_timeout=2.0).start()
    out = os.path.join(run, "trace")
    argv = [out if a == "TRACE" else a for a in _agent_argv(config, sim.path, foreground)]
    with open(os.path.join(run, "stderr"), "wb") as err:
        strace = subprocess.Popen(argv, cwd="/", stdout=subprocess.DEVNULL, stderr=err)
    try:
        parent = _pid_of(lambda argv: config in argv and "strace" not in argv)
        sim.wait_registered(30)
        yield Scene(sim, parent, syslog)
        strace.wait(30)
    finally:
        if strace.poll() is None:
            strace.kill()
        sim.stop()
        syslog.close()
        scratch.thaw(fs.mountpoint)
    trace.add(out)


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
    with scratch.filesystems(work, ["ext4"]) as (fs,):
        with _scene(work, "foreground", fs, True, trace) as scene:
            sim = scene.sim
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
        with _scene(work, "daemon", fs, False, trace) as scene:
            _cycle(scene.sim)
            scene.syslog_goes_away()  # SysLogHandler then reconnects at each record
            scene.sim.request("check", timeout=20)
            time.sleep(0.2)
            scene.sim.request("freeze", timeout=20)
            (child,) = psutil.Process(scene.parent).children()
            child.send_signal(signal.SIGTERM)  # the child's signal path, then the parent's
        with _scene(work, "stop-frozen", fs, True, trace) as scene:
            scene.sim.request("freeze", timeout=20)
            os.kill(scene.parent, signal.SIGTERM)
    return trace


def report(trace: Trace) -> list[str]:
    """The measured sets, and every syscall made that a policy does not allow."""
    arch = seccomp.native_arch()
    policies = {"child": ROOT_CHILD, "parent": parent_policy(("service",))}
    lines, problems = [], []
    for role in ("parent", "child"):
        calls = trace.calls.get(role, collections.Counter())
        allowed = policies[role].allowed()
        lines.append(f"{role} ({policies[role].role}): {len(calls)} syscalls after seccomp()")
        lines += [f"  {name:16} {n:6}" for name, n in sorted(calls.items())]
        unused = sorted(n for n in allowed if n not in calls and n in SYSCALLS[arch])
        lines.append(f"  allowed, not seen here: {', '.join(unused) or 'none'}")
        problems += [f"{role}: {name} made but not allowed" for name in sorted(calls)
                     if name not in allowed]
    return lines + (problems or ["every syscall made is allowed"])


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
