"""The four measurements.  Each returns rows of (what, figure, baseline figure)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil

from agent.dev import scratch
from agent.simulator.server import Simulator
from bench.common import StallMeter, Stats, stats
from tests.helpers import Agent

FIFREEZE, FITHAW = 0xC0045877, 0xC0045878
# FIFREEZE takes the superblock's three percpu rw-semaphores for writing; each waits for an
# RCU grace period (~8 ms here) unless the same superblock was thawed in the last few ms.
# Every timed FREEZE, the agent's and the baseline's, comes this long after the last THAW,
# as a host's FREEZE does in real use.
IDLE = 0.3
# ...and up to this much more, at random.  A FIFREEZE returns just after a scheduler tick
# (its grace periods end on one: 58 of 60 returned within the same 0.5 ms of the 4 ms tick
# here), so its time depends on where in the tick it starts.  IDLE alone is a whole number
# of ticks, and the THAW before it ended on a tick: each side's FREEZE would start at its
# own fixed point of the tick, and the agent's ~2 ms of work before its FIFREEZE could
# cost it no tick or a whole one on every repetition of a run.  20 ms is a whole number of
# ticks at 100, 250, 300 and 1000 Hz, so the point is uniform, as for a host's FREEZE,
# which knows nothing of the guest's tick.
JITTER = 0.02
RCU_EXPEDITED = "/sys/kernel/rcu_expedited"


def pause() -> None:
    """Before a timed FREEZE: IDLE, and a random part of a tick."""
    time.sleep(IDLE + random.uniform(0, JITTER))


# A daemon that answers every request at once and does nothing else, speaking the device
# protocol through the agent's own kernel channel: what the simulator itself costs.
NULL_DAEMON = r"""
import select, socket, sys
sys.path.insert(0, sys.argv[2])
from agent.kernel.channel import KernelChannel
from agent.kernel.protocol import LINUX
from agent.kernel.transport import attach
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.connect(sys.argv[1])
channel = KernelChannel(attach(sock.detach(), "linux"), LINUX)
channel.register()
poller = select.poll()
poller.register(channel.fileno(), channel.poll_mask)
while poller.poll():
    request = channel.read_request()
    if request is not None:
        channel.reply(request, True)
"""


# --- 1. control path ---------------------------------------------------------------------

def control_path(workdir: str, mount: str, n: int) -> tuple[Stats, Stats, Stats]:
    """CHECK through simulator, parent and child (without, then with the frontend and its
    sockets, no subscriber), against a daemon that does nothing on the same simulator."""
    runs = [null_daemon(workdir, n)]
    for frontend in (False, True):
        agent = shipped_agent(workdir, [mount], frontend=frontend)
        try:
            runs.append(checks(agent.sim, n))
        finally:
            agent.stop()
    return runs[1], runs[2], runs[0]


def checks(sim: Simulator, n: int) -> Stats:
    for _ in range(50):  # warm up
        sim.request("check")
    return stats([sim.request("check").latency for _ in range(n)])


def null_daemon(workdir: str, n: int) -> Stats:
    sim = Simulator(os.path.join(workdir, "null.sock"), "linux")
    sim.start()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-I", "-c", NULL_DAEMON, sim.path, root])
    try:
        sim.wait_registered(10)
        return checks(sim, n)
    finally:
        proc.kill()
        proc.wait()
        sim.stop()


# --- 2. freezing many filesystems ----------------------------------------------------------

def dirty(mounts: list[str], total_mb: int) -> None:
    """Leave total_mb of dirty page cache spread over the filesystems (no fsync)."""
    for m in mounts:
        scratch.leave_dirty(m, max(1, total_mb // len(mounts)))


def sequential_freeze(mounts: list[str]) -> tuple[float, list[int]]:
    """What the peer daemons do (hv_vss_daemon, qemu-ga): open and FIFREEZE each
    filesystem, one after another, in-process, no flush before."""
    start = time.monotonic()
    fds: list[int] = []
    try:
        for m in mounts:
            fds.append(os.open(m, os.O_RDONLY | os.O_DIRECTORY))
            fcntl.ioctl(fds[-1], FIFREEZE, 0)
    except BaseException:
        sequential_thaw(fds)
        raise
    return time.monotonic() - start, fds


def sequential_thaw(fds: list[int]) -> float:
    start = time.monotonic()
    for fd in reversed(fds):
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, FITHAW, 0)
        os.close(fd)
    return time.monotonic() - start


SHIPPED_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "etc", "hv-vss-agent.toml")


def shipped_config(path: str, workdir: str, mounts: list[str], frontend: bool = False,
                   **freeze: bool) -> None:
    """etc/hv-vss-agent.toml as shipped, but for what must change on a shared machine: the
    filesystems it may freeze ([freeze] only: ours alone), its state directory and chroot
    (in the run's directory); and the `[freeze]` keys given, and with `frontend` the
    subscriber and control sockets (in the run's directory)."""
    with open(SHIPPED_CONFIG, encoding="utf-8") as f:
        text = f.read()
    chroot = os.path.join(workdir, "empty")
    os.makedirs(chroot, mode=0o755, exist_ok=True)
    for key, value in freeze.items():  # a [freeze] key the shipped file sets, or a new one
        line = f"{key} = {'true' if value else 'false'}"
        text, found = re.subn(rf"^{key} = \S+", line, text, count=1, flags=re.MULTILINE)
        if not found:
            text = text.replace("only = []", f"only = []\n{line}", 1)
    for old, new in (
            ("only = []", "only = [" + ", ".join(json.dumps(m) for m in mounts) + "]"),
            ('dir = "/run/hv-vss-agent"', f"dir = {json.dumps(os.path.join(workdir, 'state'))}"),
            ('chroot = "/var/empty"', f"chroot = {json.dumps(chroot)}"),
            *([('# socket = "/run/hv-vss-agent/notify.sock"',
                f"socket = {json.dumps(os.path.join(workdir, 'notify.sock'))}"),
               ('# socket = "/run/hv-vss-agent/control.sock"',
                f"socket = {json.dumps(os.path.join(workdir, 'control.sock'))}")]
              if frontend else [])):
        assert old in text, f"{SHIPPED_CONFIG} has no line {old!r} any more"
        text = text.replace(old, new, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o600)


def shipped_agent(workdir: str, mounts: list[str], *, frontend: bool = False,
                  start: bool = True, **freeze: bool) -> Agent:
    """The real agent (tests/helpers.py) on the shipped config (shipped_config)."""
    os.makedirs(workdir, mode=0o755, exist_ok=True)
    agent = Agent(workdir, mounts)
    agent.debug = False  # as shipped: info and above
    shipped_config(agent.config, workdir, mounts, frontend, **freeze)
    return agent.start() if start else agent


@dataclass
class Run:
    """Means of one way of freezing, at one count of filesystems: a FIFREEZE returns just
    after a scheduler tick (see JITTER), so it takes one of a few times a tick apart, and a
    median of few samples lands on any of them at random."""

    freeze: float
    thaw: float
    stall: float


BASELINE = "sequential (peers)"
AGENT = "agent"
OPT_IN = "agent, rcu_expedited"
EXPEDITED = "sequential, rcu_expedited"


def optin_supported() -> bool:
    """Does the child know `[freeze] rcu_expedited`? (Its own reader: child_config.py.)"""
    from privileged import child_config

    with open(child_config.__file__, encoding="utf-8") as f:
        return "rcu_expedited" in f.read()


def freeze_many(workdir: str, mounts: list[str], dirty_mb: int, reps: int) -> dict[str, Run]:
    """FREEZE, THAW and the longest blocked write, each way in turn within every repetition
    (so all see the same state of the machine); the host sends THAW as soon as FREEZE is
    answered, and every FREEZE comes after pause()."""
    meter = StallMeter(mounts)
    agents: dict[str, Agent] = {}
    samples: dict[str, list[tuple[float, float, float]]] = {}
    try:
        agents[AGENT] = shipped_agent(os.path.join(workdir, "agent"), mounts)
        if optin_supported():
            agents[OPT_IN] = shipped_agent(os.path.join(workdir, "agent-optin"), mounts,
                                           rcu_expedited=True)
        ways = [BASELINE, AGENT, *([OPT_IN] if OPT_IN in agents else []), EXPEDITED]
        for _ in range(reps):
            for way in ways:
                if dirty_mb:
                    dirty(mounts, dirty_mb)
                pause()
                t0 = time.monotonic()
                if way in agents:
                    f = agents[way].sim.request("freeze", timeout=120)
                    t = agents[way].sim.request("thaw", timeout=120)
                    assert f.status == 0 and t.status == 0, (way, f, t)
                    fz, th = f.latency, t.latency
                else:
                    with rcu_expedited() if way == EXPEDITED else contextlib.nullcontext():
                        fz, fds = sequential_freeze(mounts)
                        th = sequential_thaw(fds)
                stall = meter.stall(t0, time.monotonic())
                samples.setdefault(way, []).append((fz, th, stall))
    finally:
        for a in agents.values():
            a.stop()
        meter.close()
    return {way: Run(*(statistics.fmean(x[i] for x in xs) for i in range(3)))
            for way, xs in samples.items()}


@contextlib.contextmanager
def rcu_expedited() -> Iterator[None]:
    """The kernel's RCU grace periods expedited, for this block only (a global setting)."""
    with open(RCU_EXPEDITED, encoding="ascii") as f:
        before = f.read().strip()
    with open(RCU_EXPEDITED, "w", encoding="ascii") as f:
        f.write("1")
    try:
        yield
    finally:
        with open(RCU_EXPEDITED, "w", encoding="ascii") as f:
            f.write(before)


# --- 3. memory and start-up -----------------------------------------------------------------

@dataclass
class Startup:
    ready: float  # seconds from exec to registered with the (simulated) kernel
    parent_rss: int
    child_rss: int
    frontend_rss: int  # 0 without a frontend


def startup(workdir: str, mount: str, reps: int,
            frontend: bool) -> tuple[Startup, float, int]:
    """(the agent's medians, bare start seconds, bare RSS at rest)."""
    times, prss, crss, frss = [], [], [], []
    for _ in range(reps):
        agent = shipped_agent(workdir, [mount], frontend=frontend, start=False)
        agent.sim.start()
        t = time.monotonic()
        agent.launch(wait=True)
        times.append(time.monotonic() - t)
        prss.append(agent.parent.memory_info().rss)
        crss.append(agent.child.memory_info().rss)
        frss.append(agent.frontend.memory_info().rss if frontend else 0)
        agent.stop()
    bare_t = []
    for _ in range(reps):
        t = time.monotonic()
        subprocess.run([sys.executable, "-I", "-c", "pass"], check=True)
        bare_t.append(time.monotonic() - t)
    # A bare interpreter at rest, its RSS read the same way as the agent's.
    idle = subprocess.Popen([sys.executable, "-I", "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.5)
        bare_rss = psutil.Process(idle.pid).memory_info().rss
    finally:
        idle.kill()
        idle.wait()
    return (Startup(stats(times).p50, int(stats(prss).p50), int(stats(crss).p50),
                    int(stats(frss).p50)), stats(bare_t).p50, bare_rss)




# --- 4. where one FREEZE's time goes -----------------------------------------------------------

TRACED = "recvmsg,sendmsg,syncfs,ioctl,pwrite64,openat"
STEPS = ("request to work", "selection", "open and check", "arming the thaw guard",
         "the flush, if any, to FIFREEZE", "FIFREEZE", "to the reply")


def trace_freeze(workdir: str, mount: str, reps: int) -> tuple[dict[str, float], float] | None:
    """The child's system calls during FREEZE on one filesystem, seen from outside with
    `perf trace` (timestamps and durations from the kernel's tracepoints), against the
    FIFREEZE ioctl of the baseline in the same run: (median milliseconds per step, the
    baseline's FIFREEZE).  None without perf."""
    if shutil.which("perf") is None:
        return None
    out = os.path.join(workdir, "perf-trace.txt")
    agent = shipped_agent(os.path.join(workdir, "agent-traced"), [mount])
    base: list[float] = []
    try:
        tracer = subprocess.Popen(["perf", "trace", "-T", "-o", out, "-e", TRACED,
                                   "-p", str(agent.child.pid)], stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # perf attaches
        for _ in range(reps):
            pause()
            f = agent.sim.request("freeze", timeout=60)
            t = agent.sim.request("thaw", timeout=60)
            assert f.status == 0 and t.status == 0, (f, t)
            pause()
            fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY)
            start = time.monotonic()
            fcntl.ioctl(fd, FIFREEZE, 0)
            base.append(time.monotonic() - start)
            sequential_thaw([fd])
        time.sleep(0.5)
        tracer.terminate()
        tracer.wait(10)
    finally:
        agent.stop()
    steps = _freeze_steps(out)
    if not steps:
        return None
    return ({s: stats([x[i] for x in steps]).p50 for i, s in enumerate(STEPS)},
            stats(base).p50 * 1e3)


def _freeze_steps(path: str) -> list[tuple[float, ...]]:
    """Per FREEZE, the milliseconds of each of STEPS.  The child sends to its parent
    without blocking (DONTWAIT) and to its thaw guard blocking: that tells the two
    sockets apart (perf trace leaves out an argument that is zero, such as fd 0)."""
    calls = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = re.match(r"\s*([\d.]+) \(\s*([\d.]+) ms\): (\w+)\((.*)", line)
            if m:
                found = re.search(r"fd: (\d+)", m[4])
                calls.append((float(m[1]), float(m[2]), m[3], m[4], int(found[1]) if found else 0))
    guard = next((fd for _, _, n, args, fd in calls if n == "sendmsg" and "DONTWAIT" not in args),
                 None)
    out: list[tuple[float, ...]] = []
    for i, (t0, _, name, _, fd) in enumerate(calls):
        if name != "recvmsg" or fd == guard:
            continue
        ev: dict[str, float] = {}
        for t, d, n, args, on in calls[i + 1:]:
            if n == "recvmsg" and on != guard:
                break
            if n == "openat":
                ev.setdefault("work", t)
            elif n == "pwrite64":  # the budget, saved once selection is done
                ev.setdefault("selected", t)
            elif n == "sendmsg" and "DONTWAIT" not in args:
                ev.setdefault("arm", t)
            elif n == "syncfs":
                ev.setdefault("syncfs", t)
            elif n == "ioctl" and "0x77" in args:  # FIFREEZE, _IOWR('X', 119, int)
                ev["fz"], ev["fz_end"] = t, t + d
            elif n == "sendmsg" and "fz" in ev:  # the answer (its LOG record comes after)
                ev.setdefault("reply", t)
        if {"work", "selected", "arm", "fz", "reply"} <= ev.keys():
            flush = ev.get("syncfs", ev["fz"])  # none with next to nothing dirty
            out.append((ev["work"] - t0, ev["selected"] - ev["work"], ev["arm"] - ev["selected"],
                        flush - ev["arm"], ev["fz"] - flush,
                        ev["fz_end"] - ev["fz"], ev["reply"] - ev["fz_end"]))
    return out
