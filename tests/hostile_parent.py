"""A compromised parent: it holds the real root child's socket and sends anything.

HostileParent starts the real child (ChildLink.spawn: a fresh python -I -B -S,
its real seccomp filter, a config whose [freeze] only names one scratch
filesystem), sends frames (well-formed or not, pipelined in windows), and
checks every record that comes back against Model, an independent reading
of the protocol (privileged/wire.py's layout, privileged/child.py's PERMITTED
table, the watchdog and the frozen-time budget), not the child's own code.

Invariants, checked as the frames go:
- an answer comes only for a well-formed frame the state permits, and says
  what the model says (op, sequence, status, errno, count);
- a frame the state does not permit, or a malformed one, ends the child with
  exit status 2 (EOF or an empty record: 0), never 3 (an unhandled
  exception) nor a signal, and no "internal error" is logged;
- the filesystem is writable whenever the model says it is not frozen: it
  freezes only after a well-formed FREEZE in the thawed state that the
  budget allows, and never stays frozen past max_frozen_seconds (the
  watchdog, within half a second); a second filesystem, not in the child's
  config, is never frozen at all;
- the child holds one thread and four descriptors, its sockets to the parent
  and to its thaw guard and its two state files (+1 while frozen), and one
  process, the same thaw guard all its life, which holds no target between
  requests.

Time makes answers uncertain, and the model keeps intervals instead of
guessing: what the budget holds lies between a lower and an upper bound
(the child charged and refunded at moments between a request's sending and
its answer's reading), and a FREEZE between the two may be refused or
granted.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from agent.engine.child_link import ChildLink
from privileged import wire
from tests.helpers import descriptors, status, wait_for, write_config

REQUEST = struct.Struct("<BBHI")
CHECK, FREEZE, THAW, PING, QUIT, REOPEN = 1, 2, 3, 4, 5, 6
PERMITTED = {"thawed": {CHECK, FREEZE, PING, QUIT, REOPEN},
             "frozen": {THAW, PING}, "auto-thawed": {THAW, PING}}
WINDOW = 32  # frames in flight: far below what the child's socket buffer holds
SLACK = 0.5  # the watchdog's bound, measured from the FREEZE's sending
EXIT_OK, EXIT_VIOLATION = 0, 2


class InvariantBroken(AssertionError):
    pass


@dataclass(frozen=True)
class Frame:
    data: bytes
    pass_fd: bool = False


def request(op: int, seq: int, version: int = 1, reserved: int = 0) -> bytes:
    return REQUEST.pack(version, op, reserved, seq & 0xFFFFFFFF)


EPSILON = 0.02  # float formatting in the budget record, and the two clocks' readings


@dataclass
class Bound:
    """What the budget holds at least (or at most): `left` at time `when`, refilling."""

    left: float
    when: float

    def at(self, t: float, capacity: float, rate: float) -> float:
        return min(capacity, self.left + max(0.0, t - self.when) * rate)


@dataclass
class Model:
    max_frozen: float
    capacity: float
    per_hour: float
    state: str = "thawed"
    next_seq: int = 1
    frozen_at: tuple[float, float] = (0.0, 0.0)  # (FREEZE sent, answer read)
    low: Bound = field(default_factory=lambda: Bound(0.0, 0.0))
    high: Bound = field(default_factory=lambda: Bound(0.0, 0.0))
    quitting: bool = False
    refused: int = 0  # FREEZEs the budget refused, over every child

    def __post_init__(self) -> None:
        self.low = Bound(self.capacity, 0.0)
        self.high = Bound(self.capacity, 0.0)

    @property
    def rate(self) -> float:
        return self.per_hour / 3600

    def lowest(self, t: float) -> float:
        return self.low.at(t, self.capacity, self.rate)

    def highest(self, t: float) -> float:
        return self.high.at(t, self.capacity, self.rate)

    def budget_ready_at(self, t: float) -> float:
        """When a FREEZE is sure to be granted."""
        short = self.max_frozen - self.lowest(t) + EPSILON
        return t + max(0.0, short) / self.rate

    def classify(self, frame: Frame) -> str:
        """'valid', 'violation' or 'eof' for the next frame the child reads."""
        if frame.pass_fd:
            return "violation"
        if not frame.data:
            return "eof"
        if len(frame.data) != REQUEST.size:
            return "violation"
        version, op, reserved, seq = REQUEST.unpack(frame.data)
        if version != 1 or reserved != 0 or op not in (1, 2, 3, 4, 5, 6):
            return "violation"
        if seq != self.next_seq or op not in PERMITTED[self.state]:
            return "violation"
        return "valid"

    def thawed_between(self, start: float, end: float) -> None:
        """Thawed at a moment in [start, end]: the unused part of the window came back."""
        sent, read = self.frozen_at
        least = max(0.0, sent + self.max_frozen - end)
        most = max(0.0, read + self.max_frozen - start)
        self.low = Bound(min(self.capacity, self.lowest(end) + least), end)
        self.high = Bound(min(self.capacity, self.highest(start) + most), start)

    def auto_thawed(self, read_at: float) -> None:
        if self.state == "frozen":
            self.thawed_between(self.frozen_at[0] + self.max_frozen, read_at)
            self.state = "auto-thawed"

    def answered(self, frame: Frame, res: wire.Result, sent: float, read_at: float) -> None:
        """Check the answer to a valid frame and move on."""
        _, op, _, seq = REQUEST.unpack(frame.data)
        self.next_seq = (self.next_seq + 1) & 0xFFFFFFFF
        want: tuple[object, ...]
        if op == FREEZE:
            if self.highest(read_at) < self.max_frozen - EPSILON:
                want = (wire.Status.REFUSED, errno.EAGAIN, 0)
            elif self.lowest(sent) >= self.max_frozen + EPSILON:
                want = (wire.Status.OK, 0, 1)
            else:  # the child's clock decided; either is right
                want = (res.status, res.errno, res.count)
                if want not in ((wire.Status.REFUSED, errno.EAGAIN, 0), (wire.Status.OK, 0, 1)):
                    want = (wire.Status.OK, 0, 1)
            self.refused += res.status is wire.Status.REFUSED
            if res.status is wire.Status.OK:  # a whole window taken, at a moment in between
                self.state, self.frozen_at = "frozen", (sent, read_at)
                self.low = Bound(self.lowest(read_at) - self.max_frozen, read_at)
                self.high = Bound(self.highest(sent) - self.max_frozen, sent)
        elif op == THAW:
            want = (wire.Status.OK, 0, 1 if self.state == "frozen" else 0)
            if self.state == "frozen":
                self.thawed_between(sent, read_at)
            self.state = "thawed"
        elif op == PING:
            want = (wire.Status.OK, 0, 1 if self.state == "frozen" else 0)
        elif op == CHECK:
            want = (wire.Status.OK, 0, 1)
        elif op == REOPEN:
            want = (wire.Status.FAILED, errno.ENODEV, 0)  # no device on its command line
        else:
            want = (wire.Status.OK, 0, 0)
            self.quitting = True
        got = (res.op, res.seq, res.status, res.errno, res.count)
        if got != (op, seq, *want):
            raise InvariantBroken(f"answer {got} to op {op} seq {seq} in state "
                                  f"{self.state}: expected {(op, seq, *want)}")

    def child_ended(self, frame_sent: float, now: float) -> None:
        """The child exited: it thawed on the way out what it held."""
        if self.state == "frozen":
            self.thawed_between(frame_sent, now)
        self.state, self.next_seq, self.quitting = "thawed", 1, False


class WriteCheck:
    """A write from a thread of this process: it blocks while the filesystem is frozen."""

    def __init__(self, mountpoint: str, name: str = "hostile-parent.dat") -> None:
        self.path = os.path.join(mountpoint, name)
        self.blocked: list[threading.Thread] = []

    def completes_within(self, seconds: float) -> bool:
        """One write; if it is still blocked after `seconds`, it is left to finish at the thaw."""
        done = threading.Event()

        def write() -> None:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, b"x")
            finally:
                os.close(fd)
            done.set()

        t = threading.Thread(target=write, daemon=True)
        t.start()
        if done.wait(seconds):
            t.join()
            return True
        self.blocked.append(t)
        return False

    def writable(self) -> bool:
        return self.completes_within(5.0)  # generous: a loaded machine is not a frozen disk

    def frozen(self) -> bool:
        return not self.completes_within(0.2)


def await_confined(guard: str, within: float = 5.0) -> None:
    """The thaw guard confines itself as it starts, while the child goes on to HELLO: until
    its seccomp filter is in force it may still hold its end of the child's socketpair, or
    Landlock's ruleset and the paths it names.  Its descriptors count from then on."""
    if not wait_for(lambda: status(guard)["Seccomp"] == "2", within, 0.01):
        raise InvariantBroken(f"thaw guard {guard} did not confine itself within {within} s")


@dataclass
class HostileParent:
    workdir: str
    mountpoint: str
    bystander: str  # a scratch filesystem the child's config does not name
    max_frozen: float = 1.0
    budget: float = 2.0  # two windows: two freezes left to the watchdog spend it all
    per_hour: float = 900.0  # a quarter of a second back every second
    frames: int = 0
    children: int = 0
    link: ChildLink | None = None
    guards: dict[int, str] = field(default_factory=dict)  # child pid -> its thaw guard's
    model: Model = field(init=False)
    check: WriteCheck = field(init=False)
    bystander_check: WriteCheck = field(init=False)

    def __post_init__(self) -> None:
        self.config = write_config(os.path.join(self.workdir, "hostile.toml"), [self.mountpoint],
                                   self.workdir, max_frozen=self.max_frozen, budget=self.budget,
                                   budget_per_hour=self.per_hour)
        self.model = Model(self.max_frozen, self.budget, self.per_hour)
        self.check = WriteCheck(self.mountpoint)
        self.bystander_check = WriteCheck(self.bystander, "bystander.dat")

    # --- the child's life ---------------------------------------------------------------

    def ensure_child(self) -> ChildLink:
        if self.link is None:
            self.link = ChildLink.spawn(self.config, None)
            self.link.wait_hello()
            self.link.sock.settimeout(20)
            self.children += 1
        return self.link

    def end_child(self) -> None:
        """Close our end (EOF): the child thaws and exits 0."""
        if self.link is not None:
            link, self.link = self.link, None
            sent = time.monotonic()
            link.close()
            self._reap(link, EXIT_OK, "EOF", sent)

    def _reap(self, link: ChildLink, want: int, why: str, sent: float) -> None:
        status = link.exit_status(20)
        self.model.child_ended(sent, time.monotonic())
        if status != want:
            raise InvariantBroken(f"child exit status {status} after {why}, expected {want}")
        self.assert_not_frozen(f"after the child exited ({why})")

    # --- sending and reading --------------------------------------------------------------

    def send(self, frames: list[Frame]) -> None:
        """Send `frames` in windows, checking every record that comes back.  Frames after
        the one that ended the child are not sent (a new child would expect sequence 1)."""
        for start in range(0, len(frames), WINDOW):
            if not self._send_window(frames[start:start + WINDOW]):
                return

    def _send_window(self, frames: list[Frame]) -> bool:
        """False if the child ended."""
        link = self.ensure_child()
        pending: deque[tuple[Frame, float]] = deque()
        for frame in frames:
            try:
                if frame.pass_fd:
                    r, w = os.pipe()
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]).tobytes())]
                    try:
                        link.sock.sendmsg([frame.data], anc)
                    finally:
                        os.close(r)
                        os.close(w)
                else:
                    link.sock.send(frame.data)
            except OSError:
                break  # the child is gone already: _drain sees why
            pending.append((frame, time.monotonic()))
            self.frames += 1
        return self._drain(link, pending)

    def _drain(self, link: ChildLink, pending: deque[tuple[Frame, float]]) -> bool:
        """Read until every pending frame is answered; False if the child ended."""
        while pending or self.model.quitting:
            msg, read_at = self._read(link)
            if msg is None:
                self._ended(link, pending)
                return False
            if isinstance(msg, wire.Result):
                if not pending:
                    raise InvariantBroken(f"an answer nobody asked for: {msg}")
                frame, sent = pending.popleft()
                kind = self.model.classify(frame)
                if kind != "valid":
                    raise InvariantBroken(f"the child answered {msg} to a frame it must "
                                          f"reject ({kind}): {frame.data[:16].hex()}")
                self.model.answered(frame, msg, sent, read_at)
        return True

    def _read(self, link: ChildLink) -> tuple[wire.ChildMessage | None, float]:
        """One record (None at EOF), EVENT and LOG already acted on."""
        try:
            data, _, msg_flags, _ = link.sock.recvmsg(wire.MAX_RECORD + 1)
        except ConnectionResetError:  # the child exited with frames of ours unread; what it
            data, _, msg_flags, _ = link.sock.recvmsg(wire.MAX_RECORD + 1)  # sent is still there
        read_at = time.monotonic()
        if msg_flags & socket.MSG_TRUNC:
            raise InvariantBroken("an oversized record from the child")
        if not data:
            return None, read_at
        msg = wire.decode_child(data)
        if isinstance(msg, wire.Log) and "internal error" in msg.text:
            raise InvariantBroken(f"the child logged: {msg.text}")
        if isinstance(msg, wire.Event):
            self.model.auto_thawed(read_at)
        if isinstance(msg, wire.Hello):
            raise InvariantBroken("a second HELLO")
        return msg, read_at

    def _ended(self, link: ChildLink, pending: deque[tuple[Frame, float]]) -> None:
        self.link = None
        link.close()
        if self.model.quitting:
            self._reap(link, EXIT_OK, "QUIT", time.monotonic())
            return
        frame, sent = pending[0]
        kind = self.model.classify(frame)
        if kind == "valid":
            raise InvariantBroken(f"the child ended on a valid frame {frame.data.hex()} "
                                  f"(state {self.model.state})")
        self._reap(link, EXIT_OK if kind == "eof" else EXIT_VIOLATION, kind, sent)

    def read_idle(self) -> None:
        """What the child said unasked (the watchdog's EVENT, logs), without waiting."""
        link = self.link
        if link is None:
            return
        link.sock.settimeout(0.0)
        try:
            while True:
                try:
                    msg, _ = self._read(link)
                except BlockingIOError:
                    return
                if msg is None:
                    raise InvariantBroken("the child ended while left alone")
                if isinstance(msg, wire.Result):
                    raise InvariantBroken(f"an unasked-for answer: {msg}")
        finally:
            link.sock.settimeout(20)

    def await_watchdog(self) -> None:
        """Frozen and left alone: the watchdog's EVENT must come, and the thaw be real."""
        link = self.link
        if self.model.state != "frozen" or link is None:
            return
        deadline = self.model.frozen_at[0] + self.max_frozen + SLACK
        while self.model.state == "frozen" and (left := deadline - time.monotonic()) > 0:
            link.sock.settimeout(left)
            try:
                msg, _ = self._read(link)
            except TimeoutError:
                break
            finally:
                link.sock.settimeout(20)
            if msg is None or isinstance(msg, wire.Result):
                raise InvariantBroken(f"waiting for the watchdog, got {msg}")
        if self.model.state == "frozen":
            raise InvariantBroken("still frozen past max_frozen_seconds: no watchdog EVENT")
        self.assert_not_frozen("after the watchdog's EVENT")

    def settle(self, seconds: float) -> None:
        """Leave the child alone for a while (the watchdog runs out)."""
        time.sleep(seconds)
        self.read_idle()

    def await_budget(self) -> None:
        """Leave the child alone until a FREEZE is sure to be granted."""
        now = time.monotonic()
        self.settle(self.model.budget_ready_at(now) - now)

    # --- invariants on the real system ---------------------------------------------------------

    def assert_not_frozen(self, when: str) -> None:
        if not self.check.writable():
            raise InvariantBroken(f"{self.mountpoint} is frozen {when} (model: {self.model.state})")

    def assert_bystander_untouched(self) -> None:
        if not self.bystander_check.writable():
            raise InvariantBroken(f"{self.bystander}, not in the child's config, is frozen")

    def assert_consistent(self) -> None:
        """Between steps: the real filesystem and the child's process match the model."""
        self.read_idle()
        if self.model.state == "frozen":
            if time.monotonic() > self.model.frozen_at[0] + self.max_frozen + SLACK:
                raise InvariantBroken("frozen past max_frozen_seconds, and no EVENT")
        else:
            self.assert_not_frozen("while the model says thawed")
        self.assert_bystander_untouched()
        if self.link is not None:
            pid = self.link.pid
            fds, threads = len(descriptors(pid)), len(os.listdir(f"/proc/{pid}/task"))
            with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
                children = f.read().split()
            want = 5 if self.model.state == "frozen" else 4
            if (fds, threads, len(children)) != (want, 1, 1):
                raise InvariantBroken(f"child holds {fds} descriptors, {threads} threads and "
                                      f"processes {children} (state {self.model.state})")
            # its one process, the thaw guard: the same all its life, holding no target
            # between requests (its end of their socketpair alone)
            if pid not in self.guards:
                self.guards[pid] = children[0]
                await_confined(children[0])
            guard_fds = len(descriptors(children[0]))
            if (children[0], guard_fds) != (self.guards[pid], 1):
                raise InvariantBroken(f"thaw guard {children[0]} (first {self.guards[pid]}) "
                                      f"holds {guard_fds} descriptors")

    def assert_really_frozen(self) -> None:
        if self.model.state == "frozen" and \
                time.monotonic() + 0.5 < self.model.frozen_at[0] + self.max_frozen:
            if not self.check.frozen():
                raise InvariantBroken("a write completed while the child said it was frozen")
