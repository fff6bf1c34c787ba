"""`hv-vss-agent --simulate`: the whole job, for real, on filesystems we make.

As root: two scratch filesystems (ext4 and xfs on loop devices), the built-in
host simulator on a Unix socket, and the real agent (unprivileged parent plus
root child) connected to it exactly as it would be to the kernel device.  The
simulated host runs CHECK, FREEZE, THAW cycles while one writer process per
filesystem keeps writing; the timeline shows each operation, its latency, the
bytes the agent answered, and the proof that the writers stopped while frozen
and resumed after THAW.  Everything is removed at the end.

Not root: the same agent and simulator with an in-memory freezer, and no
privilege separation; the timeline says so.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from agent.dev import scratch
from agent.engine.privdrop import DropError, lookup_account
from agent.errors import StartupError
from agent.platforms import NATIVE_PROTOCOL
from agent.simulator.host import HostRequest
from agent.simulator.server import Simulator

DEMO_USER = "hvvss"

WRITER = """\
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
block, n = b"x" * 4096, 0
while True:
    os.pwrite(fd, block, (n % 256) * 4096)
    n += 1
    print(time.monotonic(), flush=True)
    time.sleep(0.005)
"""


@dataclass
class Writer:
    """A process writing to one filesystem; we record when each write completed."""

    path: str
    proc: subprocess.Popen[str] | None = None
    done: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Writer:
        self.proc = subprocess.Popen([sys.executable, "-I", "-c", WRITER, self.path],
                                     stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._collect, daemon=True).start()
        return self

    def _collect(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.lock, contextlib.suppress(ValueError):
                self.done.append(float(line))

    def completions(self, start: float, end: float) -> int:
        with self.lock:
            return sum(1 for t in self.done if start <= t <= end)

    def first_after(self, t: float, timeout: float = 10.0) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                later = [x for x in self.done if x > t]
            if later:
                return min(later)
            time.sleep(0.001)
        return None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Timeline:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.failures: list[str] = []

    def say(self, text: str, at: float | None = None) -> None:
        t = (at if at is not None else time.monotonic()) - self.t0
        print(f"{t:8.3f}s  {text}", flush=True)

    def note(self, text: str) -> None:
        print(f"{'':10}{text}", flush=True)

    def fail(self, text: str) -> None:
        self.failures.append(text)
        self.note(f"!! {text}")


def _status(req: HostRequest) -> str:
    """What the host received: an HRESULT, whichever guest kernel answered."""
    if req.status is None:
        return "no answer"
    return "HV_S_OK" if req.status == 0 else f"HV_E_FAIL (0x{req.status:08x})"


def _reply(raw: bytes | None) -> str:
    if raw is None:
        return "(answered by the kernel)"
    if len(raw) == 64 and not any(raw[16:]):  # FreeBSD: opt, status, msgid, 48 zero bytes
        return raw[:16].hex(" ", 4) + " + 48 zero bytes"
    return raw.hex(" ", 4)


def _host(tl: Timeline, sim: Simulator, op: str, expect_ok: bool = True) -> HostRequest:
    sent = time.monotonic()
    req = sim.request(op, timeout=60)
    raw = _reply(req.daemon_reply)
    tl.say(f"host {op.upper():6} -> {_status(req):11} {req.latency * 1e3:8.2f} ms"
           f"   agent wrote: {raw}", at=sent)
    if (req.status == 0) != expect_ok:
        tl.fail(f"{op.upper()} was answered {_status(req)}")
    return req


def _config(work: str, mounts: list[str], state: str, chroot: str | None, protocol: str) -> str:
    only = ", ".join(f'"{m}"' for m in mounts)
    lines = [
        "# written by hv-vss-agent --simulate",
        "[agent]", f'user = "{DEMO_USER}"', f'chroot = "{chroot or "/var/empty"}"',
        "[device]", f'protocol = "{protocol}"',
        "[freeze]", f"only = [{only}]",
        "[watchdog]", "max_frozen_seconds = 30",
        "[state]", f'dir = "{state}"',
    ]
    path = os.path.join(work, "hv-vss-agent.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    return path


def _show_processes(tl: Timeline, agent_pid: int) -> None:
    import psutil

    parent = psutil.Process(agent_pid)
    kids = parent.children()
    for proc, role in [(parent, "parent"), *[(k, "child ") for k in kids]]:
        with proc.oneshot():
            u, g = proc.uids(), proc.gids()
            tl.note(f"{role} pid {proc.pid:>6}: uids {tuple(u)} gids {tuple(g)} "
                    f"threads {proc.num_threads()}  {' '.join(proc.cmdline()[:3])}...")


def run(args: argparse.Namespace) -> int:
    protocol = args.protocol or NATIVE_PROTOCOL
    root = os.geteuid() == 0
    print(f"hv-vss-agent demo: a simulated Hyper-V host ({protocol} driver model) drives the "
          f"agent through {args.cycles} backup cycle(s).")
    if root:
        missing = scratch.missing_tools(["ext4", "xfs"])
        if missing:
            raise StartupError(f"missing tools: {', '.join(missing)} (make demo installs them)")
        try:
            lookup_account(DEMO_USER)
        except DropError as e:
            raise StartupError(f"{e} (make demo creates it)") from None
        print("Real: the filesystems, the freezes, the privilege split. "
              "Simulated: the Hyper-V host and kernel driver.\n")
    else:
        print("NOT ROOT: using an in-memory freezer. Nothing is frozen, and the agent runs "
              "without privilege separation (both need root). Run as root for the real demo.\n")
    with tempfile.TemporaryDirectory(prefix="hv-vss-demo-") as work:
        os.chmod(work, 0o700)
        if not root:
            return _run(args, protocol, work, [], None)
        with scratch.filesystems(work, ["ext4", "xfs"]) as fss:
            chroot = os.path.join(work, "empty")
            os.mkdir(chroot, 0o755)
            return _run(args, protocol, work, fss, chroot)


def _run(args: argparse.Namespace, protocol: str, work: str, fss: list[scratch.ScratchFS],
         chroot: str | None) -> int:
    tl = Timeline()
    mounts = [fs.mountpoint for fs in fss] or ["/memory/a", "/memory/b"]
    for fs in fss:
        tl.note(f"scratch filesystem {fs}")
    cfg = _config(work, mounts, os.path.join(work, "state"), chroot, protocol)
    sock = os.path.join(work, "vss.sock")
    log_path = os.path.join(work, "agent.log")
    writers: list[Writer] = []
    agent: subprocess.Popen[bytes] | None = None
    with Simulator(sock, protocol) as sim, open(log_path, "wb") as log_file:
        try:
            # as the installed command starts it: -I -S, the launcher by its path
            launcher = os.path.join(os.path.dirname(os.path.dirname(__file__)), "__main__.py")
            cmd = [sys.executable, "-I", "-S", launcher, "-n", "--config", cfg, "--device", sock,
                   "--protocol", protocol, *(["-d"] if args.debug else []),
                   *([] if fss else ["--in-memory"])]
            tl.say("starting the agent: " + " ".join(cmd[1:]))
            agent = subprocess.Popen(cmd, stderr=log_file)
            _wait_registered(sim, agent, log_path)
            tl.say(f"agent registered with the simulated driver ({sim.connections} connection)")
            _show_processes(tl, agent.pid)
            writers = [Writer(os.path.join(fs.mountpoint, "writer.dat")).start() for fs in fss]
            time.sleep(0.2)
            _cycles(tl, sim, agent, writers, args)
        except (TimeoutError, OSError) as e:
            tl.fail(f"{type(e).__name__}: {e}")
        finally:
            for w in writers:
                w.stop()
            _stop(agent)
            for fs in fss:
                if scratch.thaw(fs.mountpoint):
                    tl.fail(f"{fs.mountpoint} was still frozen at the end")
    if agent is not None:
        tl.note("")
        tl.say(f"agent stopped (exit status {agent.returncode})")
    return _report(tl, args, log_path, real=bool(fss))


def _cycles(tl: Timeline, sim: Simulator, agent: subprocess.Popen[bytes],
            writers: list[Writer], args: argparse.Namespace) -> None:
    for cycle in range(1, args.cycles + 1):
        if agent.poll() is not None:
            tl.fail(f"the agent exited (status {agent.returncode})")
            return
        tl.note("")
        tl.note(f"--- backup cycle {cycle} ---")
        _cycle(tl, sim, writers, args.hold)


def _stop(agent: subprocess.Popen[bytes] | None) -> None:
    if agent is None:
        return
    agent.send_signal(signal.SIGTERM)
    try:
        agent.wait(15)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()


def _report(tl: Timeline, args: argparse.Namespace, log_path: str, real: bool) -> int:
    if tl.failures or args.debug:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            print("\nagent log:\n" + "".join("  " + line for line in f))
    if tl.failures:
        print(f"\nFAILED: {len(tl.failures)} problem(s): " + "; ".join(tl.failures))
        return 1
    print(f"\nOK: {args.cycles} cycle(s); every reply as expected"
          + ("; every writer stopped while frozen and resumed after THAW." if real else
             " (in-memory freezer: nothing was really frozen)."))
    return 0


def _wait_registered(sim: Simulator, agent: subprocess.Popen[bytes], log_path: str,
                     timeout: float = 30) -> None:
    """Until the agent serves: FreeBSD's driver registers at open(), before the
    agent has dropped privileges, so the agent's own log line is the signal."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            raise OSError(f"the agent exited with status {agent.returncode} before registering")
        with open(log_path, encoding="utf-8", errors="replace") as f:
            serving = "registered with the kernel" in f.read()
        if serving and sim.registered():
            return
        time.sleep(0.05)
    raise TimeoutError("the agent did not register with the simulator")


def _cycle(tl: Timeline, sim: Simulator, writers: list[Writer], hold: float) -> None:
    _host(tl, sim, "check")
    freeze = _host(tl, sim, "freeze")
    frozen_at = freeze.answered_at or time.monotonic()
    time.sleep(hold)
    thaw_sent = time.monotonic()
    for w in writers:
        n = w.completions(frozen_at, thaw_sent)
        fsname = os.path.basename(os.path.dirname(w.path))
        if n:
            tl.fail(f"writer on {fsname}: {n} write(s) completed while frozen")
        else:
            tl.note(f"writer on {fsname:5}: 0 writes completed in {thaw_sent - frozen_at:.2f} s "
                    "frozen (blocked, as it should be)")
    _host(tl, sim, "thaw")
    for w in writers:
        fsname = os.path.basename(os.path.dirname(w.path))
        first = w.first_after(thaw_sent)
        if first is None:
            tl.fail(f"writer on {fsname} did not resume after THAW")
        else:
            tl.note(f"writer on {fsname:5}: its blocked write completed "
                    f"{(first - thaw_sent) * 1e3:.1f} ms after the host sent THAW")
