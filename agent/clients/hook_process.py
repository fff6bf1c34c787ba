"""The processes of `hv-vss-agent hook`: started, waited for, drained and killed.

Some facts this module is built on:

- A hook may return while something it started in the background still holds
  its standard output: qemu's MySQL sample keeps FLUSH TABLES WITH READ LOCK in
  a background client until the thaw hook tells it to let go.  So a hook is done
  when the hook process exits, never when its output reaches end of file.
- That output must still be read whenever it comes, or the background process
  blocks on a full pipe.  Every output pipe stays in the select set until end
  of file, and its lines go to the log as they arrive.
- Each hook starts a session of its own, so the hook and everything it starts
  share one process group, which one killpg() reaches.  The group is killed
  when the hook runs past its deadline, and every group still alive is killed
  when we stop: nothing a hook started outlives `hook`.  (A process that starts
  a session of its own leaves the group, and our reach, as any daemon does.)
- A process group id is the pid of its leader, the hook.  While that pid is not
  reaped, no other process can be given it, so killpg() cannot hit a stranger.
  We therefore leave the hook a zombie while others remain in its group, and
  reap it once the group is empty (`tidy`).
- SIGCHLD, SIGTERM, SIGINT and SIGHUP wake the one select() through
  signal.set_wakeup_fd; the handlers only set flags, so no exception can cut
  a start or a kill in half.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("hv-vss-agent.hook")

OUTPUT_KEPT = 4096  # bytes of a hook's output kept for the reason of a failure
LINE_MAX = 1000  # characters of one output line in the log
REAP_WAIT = 2.0  # seconds we wait for killed leaders when we stop
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class Readable(Protocol):
    def fileno(self) -> int: ...


@dataclass
class Output:
    """A hook's stdout and stderr (one pipe): logged line by line, the tail kept."""

    label: str  # "10-mysql freeze"
    fd: int
    tail: bytes = b""
    partial: bytes = b""

    def fileno(self) -> int:
        return self.fd

    def read(self) -> bool:
        """Whatever is there, without blocking; False at end of file."""
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return True
        except OSError as e:
            log.warning("%s: reading its output failed: %s", self.label, e.strerror)
            chunk = b""
        if not chunk:
            self._log(self.partial)
            self.partial = b""
            return False
        self.tail = (self.tail + chunk)[-OUTPUT_KEPT:]
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        if len(self.partial) > LINE_MAX:
            lines.append(self.partial)
            self.partial = b""
        for line in lines:
            self._log(line)
        return True

    def _log(self, line: bytes) -> None:
        text = _UNPRINTABLE.sub("?", line.decode("utf-8", "replace").rstrip("\r"))
        if text:
            log.info("%s: %s", self.label, text[:LINE_MAX])

    def last_line(self) -> str:
        lines = self.tail.decode("utf-8", "replace").strip().splitlines()
        return _UNPRINTABLE.sub("?", lines[-1])[:100] if lines else ""


@dataclass
class Group:
    """One hook and the process group it leads."""

    proc: subprocess.Popen[bytes]
    output: Output
    status: int | None = None  # the hook's exit: >= 0 a code, < 0 a signal; still unreaped

    @property
    def pgid(self) -> int:
        return self.proc.pid

    @property
    def label(self) -> str:
        return self.output.label

    def exited(self) -> bool:
        """Has the hook itself exited?  Asked without reaping it (WNOWAIT)."""
        if self.status is None:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if info is not None and info.si_pid:
                self.status = info.si_status if info.si_code == os.CLD_EXITED \
                    else -info.si_status
        return self.status is not None


@dataclass
class Supervisor:
    """Every hook process group we started, their output, and the signals that wake us."""

    groups: list[Group] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    stopping: bool = False
    _wake_r: int = -1
    _wake_w: int = -1
    _handlers: dict[int, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self._handlers[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, _ignore)  # wakes us
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._handlers[sig] = signal.signal(sig, self._stop)

    def _stop(self, signum: int, _frame: object) -> None:
        self.stopping = True

    # --- hooks --------------------------------------------------------------------------

    def start(self, path: str, arg: str) -> Group:
        """`path arg` in a session of its own, stdin /dev/null, output to us.  OSError."""
        fd, w = os.pipe()
        try:
            proc = subprocess.Popen([path, arg], stdin=subprocess.DEVNULL, stdout=w, stderr=w,
                                    cwd="/", start_new_session=True)
        except OSError:
            os.close(fd)
            raise
        finally:
            os.close(w)
        os.set_blocking(fd, False)
        group = Group(proc, Output(f"{os.path.basename(path)} {arg}", fd))
        self.groups.append(group)
        self.outputs.append(group.output)
        return group

    def kill(self, group: Group) -> None:
        """The hook and everything in its group; its leader is still unreaped, so the id is ours."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group.pgid, signal.SIGKILL)

    def drain(self, group: Group) -> None:
        """What the hook wrote before it exited is in the pipe already: log it now."""
        if group.output in self.outputs and not group.output.read():
            self._closed(group.output)

    def tidy(self) -> None:
        """Reap the hooks whose groups are empty: their ids may go to other processes now."""
        done = [g for g in self.groups if g.exited()]
        if not done:
            return
        alive = live_groups({g.pgid for g in done})
        for g in done:
            if g.pgid not in alive:
                g.proc.wait()
                self.groups.remove(g)

    # --- waiting ------------------------------------------------------------------------

    def wait(self, until: float | None, extra: Sequence[Readable] = ()) -> list[Readable]:
        """Until `until` (monotonic), a signal, or one of `extra` readable (returned).

        Hook output is read, and logged, on the way."""
        watched: dict[int, Output | Readable | None] = {self._wake_r: None}
        watched.update((o.fd, o) for o in self.outputs)
        watched.update((e.fileno(), e) for e in extra)
        left = None if until is None else max(0.0, until - time.monotonic())
        ready, _, _ = select.select(list(watched), [], [], left)
        woken = []
        for fd in ready:
            what = watched[fd]
            if what is None:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 512):
                        pass
            elif isinstance(what, Output):
                if not what.read():
                    self._closed(what)
            else:
                woken.append(what)
        return woken

    def _closed(self, output: Output) -> None:
        self.outputs.remove(output)
        os.close(output.fd)
        self.tidy()  # end of file often means the group is gone

    # --- the end --------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every group still there, reap what we can, close everything."""
        self.tidy()
        if self.groups:
            running = [g.label for g in self.groups if not g.exited()]
            left = [g.label for g in self.groups if g.status is not None]
            log.warning("stopping: killing %s", "; ".join(
                [f"{label} (running)" for label in running]
                + [f"what {label} left running" for label in left]))
        for g in self.groups:
            self.kill(g)
        deadline = time.monotonic() + REAP_WAIT
        for g in self.groups:
            with contextlib.suppress(subprocess.TimeoutExpired):
                g.proc.wait(max(0.0, deadline - time.monotonic()))
        self.groups.clear()
        for output in self.outputs:
            os.close(output.fd)
        self.outputs.clear()
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        signal.set_wakeup_fd(-1)
        os.close(self._wake_r)
        os.close(self._wake_w)


def _ignore(_signum: int, _frame: object) -> None:
    pass


def live_groups(pgids: Iterable[int]) -> set[int]:
    """Which of these process groups still have a member that is not a zombie."""
    wanted = set(pgids)
    if os.path.exists("/proc/self/stat"):
        return wanted & set(_proc_groups())
    import psutil  # FreeBSD has no /proc by default

    alive = set()
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if p.status() != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) in wanted:
                alive.add(os.getpgid(p.pid))
    return alive


def _proc_groups() -> Iterable[int]:
    """The process group of every live process, from /proc/PID/stat (Linux)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid pgrp ...": comm may hold anything, so split after its ")"
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 2 and fields[0] not in (b"Z", b"X"):
            yield int(fields[2])
