"""The four measurements.  Each returns rows of (what, figure, baseline figure)."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil

from agent.dev import scratch
from bench.common import StallMeter, Stats, stats
from tests.helpers import Agent

FIFREEZE, FITHAW = 0xC0045877, 0xC0045878
# No background inode-table zeroing (ext4lazyinit) on the new filesystems: it writes to them
# for minutes after mkfs, and a freeze waits for it, whoever asks.
QUIET = "noinit_itable"
# FIFREEZE takes the superblock's three percpu rw-semaphores for writing; each waits for an
# RCU grace period (~8 ms here) unless the same superblock was thawed in the last few ms.
# Every timed FREEZE, the agent's and the baseline's, comes this long after the last THAW,
# as a host's FREEZE does in real use.
IDLE = 0.3
RCU_EXPEDITED = "/sys/kernel/rcu_expedited"
_libc = ctypes.CDLL(None, use_errno=True)

PINGPONG = r"""
import socket, sys, time
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
n = int(sys.argv[1])
import os
if os.fork() == 0:
    a.close()
    while True:
        m = b.recv(64)
        if not m:
            os._exit(0)
        b.send(m)
b.close()
msg, rtts = bytes(12), []
for _ in range(n):
    t = time.perf_counter()
    a.send(msg)
    a.recv(64)
    rtts.append(time.perf_counter() - t)
print(" ".join(map(str, rtts)))
"""


# --- 1. control path ---------------------------------------------------------------------

def control_path(workdir: str, mount: str, n: int) -> tuple[Stats, Stats, Stats]:
    """CHECK through simulator, parent and child (without, then with the frontend and its
    sockets, no subscriber), against a bare socketpair ping-pong."""
    out = subprocess.run([sys.executable, "-I", "-c", PINGPONG, str(n)], capture_output=True,
                         text=True, check=True)
    bare = stats([float(x) for x in out.stdout.split()])
    runs = []
    for frontend in (False, True):
        agent = Agent(workdir, [mount], frontend=frontend).start()
        try:
            for _ in range(50):  # warm up
                agent.sim.request("check")
            runs.append(stats([agent.sim.request("check").latency for _ in range(n)]))
        finally:
            agent.stop()
    return runs[0], runs[1], bare


# --- 2. freeze latency and write stall ---------------------------------------------------

def dirty(mounts: list[str], total_mb: int) -> None:
    """Leave total_mb of dirty page cache spread over the filesystems (no fsync)."""
    per = max(1, total_mb // len(mounts))
    chunk = b"d" * (1 << 20)
    for m in mounts:
        fd = os.open(os.path.join(m, "dirty.dat"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for i in range(per):
                os.pwrite(fd, chunk, i << 20)
        finally:
            os.close(fd)


def bare_freeze(mounts: list[str], presync: bool) -> tuple[float, list[int]]:
    """What the child does, in-process, without any of the agent: the floor."""
    fds = [os.open(m, os.O_RDONLY | os.O_DIRECTORY) for m in mounts]
    start = time.monotonic()
    if presync:
        for fd in fds:
            _libc.syncfs(fd)
    for fd in fds:
        fcntl.ioctl(fd, FIFREEZE, 0)
    return time.monotonic() - start, fds


def bare_thaw(fds: list[int]) -> float:
    start = time.monotonic()
    for fd in reversed(fds):
        fcntl.ioctl(fd, FITHAW, 0)
        os.close(fd)
    return time.monotonic() - start


def freeze_and_stall(workdir: str, mounts: list[str], dirty_mb: int, presync: bool,
                     reps: int) -> tuple[float, float, float, float]:
    """(agent FREEZE latency, agent stall, bare latency, bare stall), medians.  Agent and
    baseline take turns, so both see the same state of the machine."""
    meter = StallMeter(mounts)
    a_lat, a_stall, b_lat, b_stall = [], [], [], []
    agent = Agent(workdir, mounts, presync=presync, frontend=False)
    try:
        agent.start()
        for _ in range(reps):
            if dirty_mb:
                dirty(mounts, dirty_mb)
            t0 = time.monotonic()
            freeze = agent.sim.request("freeze", timeout=120)
            assert freeze.status == 0, freeze
            agent.sim.request("thaw", timeout=60)
            a_lat.append(freeze.latency)
            a_stall.append(meter.stall(t0, time.monotonic()))
            time.sleep(IDLE)
            if dirty_mb:
                dirty(mounts, dirty_mb)
            t0 = time.monotonic()
            lat, fds = bare_freeze(mounts, presync)
            bare_thaw(fds)
            b_lat.append(lat)
            b_stall.append(meter.stall(t0, time.monotonic()))
            time.sleep(IDLE)
    finally:
        agent.stop()
        meter.close()
    med = [stats(x).p50 for x in (a_lat, a_stall, b_lat, b_stall)]
    return med[0], med[1], med[2], med[3]


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
        agent = Agent(workdir, [mount], frontend=frontend)
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


# --- 4. scale --------------------------------------------------------------------------------

def scale_point(workdir: str, mounts: list[str], reps: int) -> ScalePoint:
    """Latency medians for these mounts, agent and baseline taking turns, each FREEZE a
    while after the last THAW (see IDLE)."""
    agent = Agent(workdir, mounts, frontend=False).start()
    fz, th, bf, bt, ef = [], [], [], [], []
    try:
        for _ in range(reps):
            time.sleep(IDLE)
            f = agent.sim.request("freeze", timeout=120)
            t = agent.sim.request("thaw", timeout=120)
            assert f.status == 0 and t.status == 0, (f, t)
            fz.append(f.latency)
            th.append(t.latency)
            time.sleep(IDLE)
            lat, fds = bare_freeze(mounts, presync=True)
            bf.append(lat)
            bt.append(bare_thaw(fds))
            time.sleep(IDLE)
            with rcu_expedited():
                lat, fds = bare_freeze(mounts, presync=True)
                bare_thaw(fds)
            ef.append(lat)
    finally:
        agent.stop()
    return ScalePoint(len(mounts), stats(fz).p50, stats(th).p50, stats(bf).p50,
                      stats(bt).p50, stats(ef).p50)


@dataclass
class ScalePoint:
    mounts: int
    freeze: float
    thaw: float
    bare_freeze: float
    bare_thaw: float
    bare_freeze_expedited: float


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


@contextlib.contextmanager
def many_filesystems(workdir: str, n: int, size_mb: int) -> Iterator[list[scratch.ScratchFS]]:
    """Up to n ext4 scratch filesystems: as many as this machine allows."""
    made: list[scratch.ScratchFS] = []
    try:
        for i in range(n):
            try:
                made.append(scratch.make(workdir, "ext4", name=f"fs{i:03d}", size_mb=size_mb,
                                         options=QUIET))
            except scratch.ScratchError as e:
                print(f"  stopped at {len(made)} filesystems: {e}", file=sys.stderr)
                break
            if (i + 1) % 32 == 0:
                print(f"  {i + 1}/{n} scratch filesystems", file=sys.stderr, flush=True)
        yield made
    finally:
        for fs in reversed(made):
            scratch.destroy(fs)
