"""Test helpers: the real agent against the simulator, and write probes.

Everything here acts on filesystems the tests made themselves (tests/conftest.py),
and the agent's config restricts it to exactly those ([freeze] only).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import psutil

from agent.simulator.server import Simulator

if TYPE_CHECKING:
    import pytest

PY = sys.executable
# For processes under other uids: the venv's interpreter may live where only root can
# reach it (pyenv under /root).  What they run needs only the standard library.
USER_PY = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else PY
EXT4_IOC_SHUTDOWN = 0x8004587D
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# How the daemon is started: the launcher by its path, no site.py, no .pth, no PYTHON*.
LAUNCH = ("-I", "-S", os.path.join(REPO, "agent", "__main__.py"))

PROBE = """\
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
os.write(fd, b"probe\\n")
os.close(fd)
"""


class Probe:
    """One write from another process.  While the filesystem is frozen it blocks."""

    def __init__(self, mountpoint: str, name: str = "probe.dat") -> None:
        self.proc = subprocess.Popen([PY, "-I", "-c", PROBE, os.path.join(mountpoint, name)])

    def done_within(self, seconds: float) -> bool:
        try:
            self.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            return False
        assert self.proc.returncode == 0
        return True

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def assert_blocked(mountpoint: str, seconds: float = 0.5) -> Probe:
    probe = Probe(mountpoint)
    assert not probe.done_within(seconds), f"a write to {mountpoint} completed: not frozen"
    return probe


def assert_writable(mountpoint: str, seconds: float = 5.0) -> None:
    probe = Probe(mountpoint)
    try:
        assert probe.done_within(seconds), f"a write to {mountpoint} blocked: still frozen"
    finally:
        probe.kill()


def shutdown_ext4(mountpoint: str) -> None:
    """Make the filesystem fail: after EXT4_IOC_SHUTDOWN, FIFREEZE returns EIO."""
    fd = os.open(mountpoint, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", 0))
    finally:
        os.close(fd)


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def toml_section(name: str, values: dict[str, object]) -> str:
    return f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())


def write_config(path: str, mounts: list[str], workdir: str, *, protocol: str = "linux",
                 max_frozen: float = 30, budget: float | None = None,
                 budget_per_hour: float | None = None, presync: bool = True,
                 rcu_expedited: bool = False,
                 kernel_timeout: float = 15.0, extra: str = "",
                 frontend: bool = True, notify: dict[str, object] | None = None,
                 control: dict[str, object] | None = None,
                 metrics: dict[str, object] | None = None) -> str:
    """The agent's config; by default with the frontend (subscriber and control sockets)."""
    only = ", ".join(f'"{m}"' for m in mounts)
    if frontend:
        extra += toml_section("notify", {"socket": os.path.join(workdir, "notify.sock"),
                                         **(notify or {})})
        extra += toml_section("control", {"socket": os.path.join(workdir, "control.sock"),
                                          **(control or {})})
    if metrics:
        extra += toml_section("metrics", metrics)
    chroot = os.path.join(workdir, "empty")
    os.makedirs(chroot, mode=0o755, exist_ok=True)
    text = f"""
[agent]
user = "hvvss"
chroot = "{chroot}"
[device]
protocol = "{protocol}"
kernel_timeout = {kernel_timeout}
[freeze]
only = [{only}]
presync = {"true" if presync else "false"}
{"rcu_expedited = true" if rcu_expedited else ""}
[watchdog]
max_frozen_seconds = {max_frozen}
{f"budget_seconds = {budget}" if budget is not None else ""}
{f"budget_seconds_per_hour = {budget_per_hour}" if budget_per_hour is not None else ""}
[state]
dir = "{os.path.join(workdir, 'state')}"
{extra}
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


class Agent:
    """The real agent (`python -I -S agent/__main__.py -n`) connected to a simulator."""

    def __init__(self, workdir: str, mounts: list[str], *, protocol: str = "linux",
                 sim_timeouts: dict[str, float] | None = None, extra_args: tuple[str, ...] = (),
                 log_path: str | None = None, **config: object) -> None:
        self.workdir = workdir
        self.config = write_config(os.path.join(workdir, "agent.toml"), mounts, workdir,
                                   protocol=protocol, **config)  # type: ignore[arg-type]
        self.socket = os.path.join(workdir, "vss.sock")
        self.sim = Simulator(self.socket, protocol, **(sim_timeouts or {}))
        self.log_path = log_path or os.path.join(workdir, "agent.log")
        self.extra_args = extra_args
        self.python = PY  # the interpreter (and so the install) the agent runs from
        self.argv_prefix: list[str] | None = None  # in place of the launcher below
        self.debug = True  # -d: log at debug level
        self.cwd = REPO
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> Agent:
        self.sim.start()
        return self.launch(wait)

    def launch(self, wait: bool = True) -> Agent:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*(self.argv_prefix or [self.python, *LAUNCH]), "-n",
                 *(["-d"] if self.debug else []), "--config", self.config,
                 "--device", self.socket, *self.extra_args], stderr=log, cwd=self.cwd)
        if wait:
            self.wait_registered()
        return self

    def wait_registered(self, timeout: float = 30, connections: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(TimeoutError):
                self.sim.wait_registered(0.1, connections)
                return
        raise AssertionError(f"agent did not register:\n{self.log()}")

    @property
    def parent(self) -> psutil.Process:
        assert self.proc is not None
        return psutil.Process(self.proc.pid)

    @property
    def child(self) -> psutil.Process:
        kids = [p for p in self.parent.children() if p.uids().real == 0]
        assert len(kids) == 1, kids
        return kids[0]

    @property
    def frontend(self) -> psutil.Process:
        kids = [p for p in self.parent.children() if p.uids().real != 0]
        assert len(kids) == 1, kids
        return kids[0]

    @property
    def notify_socket(self) -> str:
        return os.path.join(self.workdir, "notify.sock")

    @property
    def control_socket(self) -> str:
        return os.path.join(self.workdir, "control.sock")

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_exit(self, timeout: float = 10) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sim.stop()


@contextlib.contextmanager
def running_agent(workdir: str, mounts: list[str], **kw: object) -> Iterator[Agent]:
    agent = Agent(workdir, mounts, **kw)  # type: ignore[arg-type]
    try:
        yield agent.start()
    finally:
        agent.stop()


def status(pid: int | str) -> dict[str, str]:
    """/proc/<pid>/status as the kernel says it, field by field."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}


def descriptors(pid: int | str) -> dict[int, tuple[str, int]]:
    """fd -> (what it points at, open flags), but for the descriptor a mutation copy's line
    tracer keeps in every process it traces (tools/mutation/tracer.py; none elsewhere)."""
    tracer = sys.modules.get("privileged._mutation_trace")
    skip = os.path.dirname(tracer.CURRENT) + "/" if tracer is not None else None
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            with open(f"/proc/{pid}/fdinfo/{name}", encoding="ascii") as f:
                flags = int(next(x for x in f if x.startswith("flags:")).split()[1], 8)
        except FileNotFoundError:
            continue  # closed while we looked
        if skip is None or not target.startswith(skip):
            out[int(name)] = (target, flags)
    return out


def wait_for(predicate: object, timeout: float = 5.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(step)
    return False


# --- subscribers -----------------------------------------------------------------------

SUBSCRIBER = """\
import socket, sys, time
path, name, rules, out = sys.argv[1:5]
actions = dict(r.split("=", 1) for r in rules.split(",") if r)
def note(*words):
    with open(out, "a") as f:
        f.write(" ".join(str(w) for w in words) + "\\n")
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
f = s.makefile("rwb", buffering=0)
note("greeting", f.readline().decode().strip())
f.write(("HELLO 1 %s\\n" % name).encode())
note("welcome", f.readline().decode().strip())
for line in f:
    words = line.decode().split()
    if words[0] not in ("CHECK", "FREEZE", "THAW"):
        note("other", line.decode().strip())
        continue
    event, txid, ms = words
    note("event", event, txid, ms, time.monotonic())
    action = actions.get(event, "ok")
    if action.startswith("slow:"):
        time.sleep(float(action[5:]))
        action = "ok"
    if action == "ok":
        f.write(("OK %s %s\\n" % (event, txid)).encode())
    elif action == "veto":
        f.write(("VETO %s %s backup window closed\\n" % (event, txid)).encode())
    elif action == "fail":
        f.write(("FAIL %s %s could not flush\\n" % (event, txid)).encode())
    elif action == "die":
        note("dying")
        sys.exit(0)
    elif action == "garbage":
        f.write(b"MAYBE later\\n")
    elif action == "oversized":
        f.write(b"OK " + b"x" * 600 + b"\\n")
    note("answered", event, txid, action)
note("agent closed")
"""


class Subscriber:
    """A scripted subscriber process: `rules` say how it answers each event."""

    def __init__(self, path: str, workdir: str, *, name: str = "sub", rules: str = "",
                 user: str | int | None = None, group: str | int | None = None,
                 extra_groups: list[str | int] | None = None) -> None:
        self.out = os.path.join(workdir, f"{name}.events")
        with open(self.out, "w"):
            pass
        os.chmod(self.out, 0o666)
        self.proc = subprocess.Popen(
            [USER_PY, "-I", "-c", SUBSCRIBER, path, name, rules, self.out],
            user=user, group=group, extra_groups=extra_groups, cwd="/",
            stderr=subprocess.DEVNULL)

    def lines(self) -> list[str]:
        with open(self.out, encoding="utf-8") as f:
            return f.read().splitlines()

    def wait_welcome(self, timeout: float = 10) -> str:
        assert wait_for(lambda: len(self.lines()) >= 2 or self.proc.poll() is not None,
                        timeout), "the subscriber never heard back"
        return "\n".join(self.lines())

    def events(self) -> list[str]:
        return [line.split()[1] for line in self.lines() if line.startswith("event ")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def cli(*args: str, user: str | None = None, group: str | None = None,
        extra_groups: list[str] | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`hv-vss-agent ARGS` as a separate process, optionally as another user."""
    return subprocess.run([USER_PY if user else PY, "-m", "agent", *args], cwd=REPO,
                          capture_output=True, text=True,
                          user=user, group=group, extra_groups=extra_groups, timeout=timeout,
                          check=False)


def child_conversation_modules(workdir: str, mountpoint: str,
                               monkeypatch: pytest.MonkeyPatch) -> tuple[object, set[str]]:
    """The real child, started by ChildLink for `mountpoint`, through a whole conversation
    (CHECK, FREEZE, THAW, REOPEN, PING, QUIT): its HELLO, and every module it had loaded
    at its exit."""
    from agent.engine import child_link, child_start
    from privileged import wire

    out = os.path.join(workdir, "modules")
    real_bootstrap = child_start.child_bootstrap
    # the file is opened before main() confines the child: it may write only what it holds
    monkeypatch.setattr(child_start, "child_bootstrap", lambda: real_bootstrap(
        f"f = open({out!r}, 'w'); from privileged.child import main; rc = main(); "
        "f.write(' '.join(sorted(sys.modules))); f.close(); sys.exit(rc)"))
    link = child_link.ChildLink.spawn(write_config(os.path.join(workdir, "c.toml"),
                                                   [mountpoint], workdir), None)
    hello = link.wait_hello()
    for op in (wire.Op.CHECK, wire.Op.FREEZE, wire.Op.THAW, wire.Op.REOPEN, wire.Op.PING,
               wire.Op.QUIT):
        assert link.request(op)[0].op is op
    assert link.exit_status(10) == 0
    with open(out, encoding="ascii") as f:
        return hello, set(f.read().split())
