"""The frontend: the one process that talks to untrusted local clients.

It owns the subscriber socket ([notify] socket) and the control socket
([control] socket), and nothing else: not the kernel device, not the link to
the root child, not the metrics directory.  It is forked from the engine with
multiprocessing (fork start method) after the engine has dropped privileges,
so it starts unprivileged and chrooted, and its log records reach the
engine's log stream through multiprocessing-logging's queue, where the
engine's FreezeGate holds them while frozen like any other record.

main() reads top to bottom: close every inherited descriptor we do not need
-> signals -> serve until the engine goes away.

System calls it makes once serving (strace -f on Linux, for the seccomp
filter of issue 4): poll, accept4, getsockname and getsockopt (Python's
socket object for an accepted descriptor; SO_PEERCRED, SO_PEERGROUPS), ioctl
(FIONBIO only, from setblocking), recvfrom, sendto, close, write (the
logging queue's pipe), futex (the queue's feeder thread), getpid (log
records); memory management (brk, mmap, munmap, madvise) as the interpreter
needs; at start close_range (or close) and rt_sigaction; at exit exit,
exit_group.  It opens no file and creates no socket.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import multiprocessing.process
import os
import select
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agent import mp_logging
from agent.allowlist import Allowlist
from agent.frontend.subscribers import Garbage, Heard, Registry, Subscriber
from agent.peercred import PeerCred, describe, peer_credentials
from agent.protocols import control
from agent.protocols import frontend as fw
from agent.protocols import notify as nw
from agent.protocols.frontend import Outcome
from agent.sandbox import confine_frontend

log = logging.getLogger("hv-vss-agent.frontend")

HELLO_TIMEOUT = 10.0  # a connected peer must introduce itself within this
CONTROL_TIMEOUT = 5.0
MAX_CONTROL = 8
# No one uid holds more than this many subscriber connections (said HELLO or not),
# so one allowlisted user cannot take the MAX_SUBSCRIBERS slots from the others.
MAX_PER_UID = 8
# Connections taken off a listening socket per turn of the loop: the queue is drained
# (refused peers are closed at once), but a flood cannot keep the loop from the rest.
ACCEPT_BATCH = 256
REFUSALS_LOGGED_PER_MINUTE = 10
POLL_IN = select.POLLIN | select.POLLHUP | select.POLLERR


@dataclass
class Plan:
    """Everything the frontend needs, made by root before the drop."""

    link: socket.socket  # the frontend's end of the engine <-> frontend socketpair
    notify: socket.socket | None
    control: socket.socket | None
    allow: Allowlist
    admin_gid: int | None
    timeout: float  # [notify] timeout, per subscriber and event


def start(plan: Plan, engine_end: socket.socket,
          close_in_child: Iterable[Callable[[], None]]) -> multiprocessing.process.BaseProcess:
    """Fork the frontend; in the engine, close what only the frontend uses."""
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=main, args=(plan, [engine_end.close, *close_in_child]),
                       name="hv-vss-agent-frontend", daemon=False)
    proc.start()
    for s in (plan.link, plan.notify, plan.control):
        if s is not None:
            s.close()
    return proc


def main(plan: Plan, close_in_child: list[Callable[[], None]]) -> None:
    mp_logging.use_queue()
    for close in close_in_child:
        with contextlib.suppress(OSError):
            close()
    close_inherited(plan)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine decides when we stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    confine_frontend()  # its own seccomp filter (agent/sandbox_linux.py FRONTEND)
    Frontend(plan).serve()


def close_inherited(plan: Plan) -> None:
    """Every descriptor but ours and the logging queue's goes.

    In particular our copies of the root child's socket and of the kernel
    device: otherwise the child would not see EOF when the engine dies, and
    the kernel would think the daemon still registered."""
    keep = {0, 1, 2, plan.link.fileno()}
    keep |= {s.fileno() for s in (plan.notify, plan.control) if s is not None}
    keep |= _logging_queue_fds()
    start = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, _max_fd())


def _logging_queue_fds() -> set[int]:
    # multiprocessing-logging's queue is a pipe we must keep writing to.
    fds = set()
    for h in logging.getLogger().handlers:
        queue = getattr(h, "queue", None)
        for end in ("_reader", "_writer"):
            conn = getattr(queue, end, None)
            if conn is not None and not conn.closed:
                fds.add(conn.fileno())
    return fds


def _max_fd() -> int:
    try:
        return min(os.sysconf("SC_OPEN_MAX"), 1 << 20)
    except (OSError, ValueError):
        return 1 << 16


@dataclass
class Conn:
    sock: socket.socket
    cred: PeerCred
    deadline: float | None
    buffer: nw.LineBuffer = field(default_factory=nw.LineBuffer)
    sub: Subscriber | None = None  # None: a control connection
    out: bytes = b""  # a control answer still to be written


class Frontend:
    def __init__(self, plan: Plan, clock: Callable[[], float] = time.monotonic) -> None:
        self.plan = plan
        self.clock = clock
        self.registry = Registry(plan.timeout)
        self.conns: dict[int, Conn] = {}
        self.engine_status: dict[str, object] | None = None
        self.counters: Counter[str] = Counter()
        self.refusal_window = (0.0, 0)  # (window start, lines logged in it)
        self.poller = select.poll()
        self.started = time.time()
        self.told_hearing: int | None = None  # the count the engine was last given

    # --- the loop ---------------------------------------------------------------------

    def serve(self) -> None:
        self.poller.register(self.plan.link.fileno(), POLL_IN)
        for lst in (self.plan.notify, self.plan.control):
            if lst is not None:
                self.poller.register(lst.fileno(), select.POLLIN)
        log.debug("frontend %d serving", os.getpid())
        self._tell_hearing()
        while True:
            ready = dict(self.poller.poll(self._timeout_ms()))
            if self.plan.link.fileno() in ready and not self._from_engine():
                return
            if self.plan.notify is not None and self.plan.notify.fileno() in ready:
                self._accept_all(self.plan.notify, subscriber=True)
            if self.plan.control is not None and self.plan.control.fileno() in ready:
                self._accept_all(self.plan.control, subscriber=False)
            for fd in ready:
                conn = self.conns.get(fd)
                if conn is not None and conn.out:  # writable, or the client hung up
                    self._write_answer(conn)
                elif conn is not None:
                    self._readable(conn)
            self._tick()

    def _timeout_ms(self) -> int | None:
        deadlines = [c.deadline for c in self.conns.values() if c.deadline is not None]
        nxt = self.registry.next_deadline()
        if nxt is not None:
            deadlines.append(nxt)
        if not deadlines:
            return None
        return max(0, int((min(deadlines) - self.clock()) * 1000) + 1)

    def _tick(self) -> None:
        now = self.clock()
        for sub, event in self.registry.expire(now):
            log.warning("subscriber %s (%s) did not answer %s in time", sub.label,
                        describe(sub.cred), event.value)
            self.counters["timeouts"] += 1
        for conn in list(self.conns.values()):
            if conn.deadline is not None and now >= conn.deadline:
                what = "HELLO" if conn.sub is not None else "request"
                log.warning("%s (%s) did not complete its %s in time: disconnected",
                            "subscriber" if conn.sub else "control client",
                            describe(conn.cred), what)
                self._drop(conn, Outcome.TIMEOUT, f"no {what} in time")
        for done in self.registry.finished():
            self.plan.link.sendall(fw.encode_done(done))

    # --- the engine ---------------------------------------------------------------------

    def _tell_hearing(self) -> None:
        """Give the engine the number of subscribers an event would reach, when it changed:
        before a new subscriber is welcomed, so no event it could be sent is skipped."""
        count = sum(1 for sub in self.registry.subs.values() if sub.name)
        if count != self.told_hearing:
            self.plan.link.sendall(fw.encode_hearing(fw.Hearing(count)))
            self.told_hearing = count

    def _from_engine(self) -> bool:
        """False when the engine has gone away."""
        try:
            data = self.plan.link.recv(fw.MAX_RECORD + 1)
        except OSError:
            data = b""
        if not data:
            log.debug("the engine closed the link: frontend exiting")
            return False
        msg = fw.decode_engine(data)  # from the engine: trusted, a failure is our bug
        if isinstance(msg, fw.StatusUpdate):
            update = json.loads(msg.json)
            if msg.whole:
                self.engine_status = update
            else:
                assert self.engine_status is not None, "CHANGES before any STATUS"
                self.engine_status = fw.apply_changes(self.engine_status, update)
            return True
        for sub, notice in self.registry.start(msg.event, msg.txid, msg.ms, self.clock()):
            self._send(sub, nw.encode_notice(notice))
        return True

    # --- connections --------------------------------------------------------------------------

    def _accept_all(self, listener: socket.socket, subscriber: bool) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept failed: %s", e.strerror)
                return
            self._accept(sock, subscriber)

    def _accept(self, sock: socket.socket, subscriber: bool) -> None:
        sock.setblocking(False)
        try:
            cred = peer_credentials(sock)
        except OSError as e:
            log.warning("cannot read a peer's credentials (%s): refused", e.strerror)
            sock.close()
            return
        now = self.clock()
        if subscriber:
            reason = self._refuse_subscriber(cred)
            if reason:
                self._refuse(sock, cred, "subscriber", reason)
                return
            conn = Conn(sock, cred, now + HELLO_TIMEOUT, sub=self.registry.add(cred, now))
            self.counters["subscribers_accepted"] += 1
        else:
            if not control.authorized(cred, self.plan.admin_gid):
                self._refuse(sock, cred, "control client", "not root nor in [control] "
                             "admin_group")
                return
            if sum(1 for c in self.conns.values() if c.sub is None) >= MAX_CONTROL:
                self._refuse(sock, cred, "control client", "too many control connections")
                return
            conn = Conn(sock, cred, now + CONTROL_TIMEOUT)
        self.conns[sock.fileno()] = conn
        self.poller.register(sock.fileno(), POLL_IN)
        if conn.sub is not None:
            self._send(conn.sub, nw.encode_greeting())

    def _refuse_subscriber(self, cred: PeerCred) -> str:
        if not self.plan.allow.allows(cred):
            return "not in [notify] allow_users or allow_groups"
        if sum(1 for s in self.registry.subs.values() if s.cred.uid == cred.uid) >= MAX_PER_UID:
            return f"too many connections from uid {cred.uid} ({MAX_PER_UID})"
        if len(self.registry.subs) >= fw.MAX_SUBSCRIBERS:
            return f"too many subscribers ({fw.MAX_SUBSCRIBERS})"
        return ""

    def _refuse(self, sock: socket.socket, cred: PeerCred, who: str, reason: str) -> None:
        self.counters["refused"] += 1
        if who == "subscriber":
            with contextlib.suppress(OSError):
                sock.send(nw.encode_refused(reason))
        sock.close()
        # A refused peer can connect in a loop: the log gets a bounded share of that.
        now = self.clock()
        start, logged = self.refusal_window
        if now - start >= 60:
            if logged > REFUSALS_LOGGED_PER_MINUTE:
                log.warning("%d more refused connections were not logged",
                            logged - REFUSALS_LOGGED_PER_MINUTE)
            start, logged = now, 0
        logged += 1
        self.refusal_window = (start, logged)
        if logged <= REFUSALS_LOGGED_PER_MINUTE:
            log.warning("refused %s %s: %s", who, describe(cred), reason)

    def _readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if conn.sub is None:
            self._control(conn, data)
            return
        sub = conn.sub
        if not data:
            if sub.outstanding:
                log.warning("subscriber %s (%s) disconnected before answering %s", sub.label,
                            describe(sub.cred), sub.outstanding[0][0].value)
            else:
                log.info("subscriber %s (%s) disconnected", sub.label, describe(sub.cred))
            self._drop(conn, Outcome.DISCONNECTED, "disconnected")
            return
        try:
            for line in conn.buffer.feed(data):
                heard = self.registry.heard(sub, nw.decode_subscriber_line(line), self.clock())
                if heard is Heard.WELCOME:
                    conn.deadline = None
                    log.info("subscriber %s connected (%s)", sub.name, describe(sub.cred))
                    self._tell_hearing()
                    self._send(sub, nw.encode_welcome(sub.id))
                elif heard is Heard.LATE:
                    log.info("subscriber %s answered too late: %s", sub.label,
                             line.decode(errors="replace").strip()[:80])
        except (nw.NotifyProtocolError, Garbage) as e:
            self.counters["garbage"] += 1
            log.warning("subscriber %s (%s) broke the protocol (%s): disconnected", sub.label,
                        describe(sub.cred), e)
            with contextlib.suppress(OSError):
                conn.sock.send(nw.encode_error(str(e)))
            self._drop(conn, Outcome.GARBAGE, f"protocol error: {e}")

    def _send(self, sub: Subscriber, data: bytes) -> None:
        conn = next((c for c in self.conns.values() if c.sub is sub), None)
        if conn is None:
            return
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, OSError):
            sent = -1
        if sent != len(data):
            log.warning("subscriber %s (%s) is not reading: disconnected", sub.label,
                        describe(sub.cred))
            self._drop(conn, Outcome.DISCONNECTED, "not reading")

    def _drop(self, conn: Conn, outcome: Outcome, reason: str) -> None:
        fd = conn.sock.fileno()
        if fd < 0:
            return  # already dropped (a failed send while handling its own lines)
        self.conns.pop(fd, None)
        with contextlib.suppress(KeyError):
            self.poller.unregister(fd)
        conn.sock.close()
        if conn.sub is not None:
            self.registry.gone(conn.sub, outcome, reason, self.clock())
            self._tell_hearing()

    # --- control ---------------------------------------------------------------------------------

    def _control(self, conn: Conn, data: bytes) -> None:
        try:
            control.check_request(data)
        except control.ControlError as e:
            log.warning("control client %s: %s", describe(conn.cred), e)
            self._drop(conn, Outcome.GARBAGE, str(e))
            return
        self.counters["status_requests"] += 1
        # Written as the client reads it, never blocking: subscribers may be waiting.
        engine = control.brought_up_to(self.engine_status, time.time(), time.monotonic())
        conn.out = control.encode_answer(engine, self.status())
        self.poller.modify(conn.sock.fileno(), select.POLLOUT)
        self._write_answer(conn)

    def _write_answer(self, conn: Conn) -> None:
        try:
            conn.out = conn.out[conn.sock.send(conn.out):]
        except BlockingIOError:
            return
        except OSError:
            conn.out = b""
        if not conn.out:
            self._drop(conn, Outcome.OK, "")

    def status(self) -> dict[str, object]:
        now = self.clock()
        return {"pid": os.getpid(), "started": self.started,
                "subscribers": [s.as_dict(now) for s in self.registry.subs.values()],
                "counters": dict(self.counters)}
