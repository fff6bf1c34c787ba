"""The root child: holds the freezes, obeys six words, thaws on anything odd.

Started by root as a fresh interpreter (python -I -B -S, its sys.path the
standard library alone; agent/engine/child_link.py), with its end of a
SOCK_SEQPACKET socketpair as the only descriptor it inherits.  main() reads
top to bottom: harden (capabilities first) -> config -> state files ->
recover -> backend -> Landlock and seccomp -> HELLO -> loop, and every way
out of the loop (EOF, QUIT, a signal, a protocol violation, an exception)
goes through the same thaw.

The state machine is the table PERMITTED: a request not permitted in the
current state is a protocol violation, and a violation means thaw and exit.
AUTO_THAWED is where the watchdog or a signal leaves us: the parent has not
seen the thaw yet, so its THAW (already on the way, or sent to resync) is
answered, not punished.

The watchdog's deadline is stamped before the first flush of a FREEZE; the
thaw guard (guard.py) keeps it while freezing, the loop below keeps it
afterwards.  The frozen-time budget (budget.py) decides whether a FREEZE may
start at all.
"""

from __future__ import annotations

import argparse
import enum
import errno
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from privileged import wire
from privileged.budget import Bucket
from privileged.channel import Channel, FrameLogHandler, ProtocolViolation
from privileged.config import ChildConfig, ConfigError, load_child_config
from privileged.device import Identity, identify, open_device
from privileged.freezer import FreezeFailed, Freezer, Held, freeze_all, thaw
from privileged.hardening import harden_child, quiet_stdio, thread_count
from privileged.rcu import PATH as RCU_PATH
from privileged.rcu import Expedite
from privileged.rcu import recover as recover_rcu
from privileged.sandbox import confine_child
from privileged.selection import Selection, Verdict, select_targets, under
from privileged.statefile import StateDir
from privileged.trust import directories_reason
from privileged.wire import Op, Status

log = logging.getLogger("hv-vss-agent.child")

EXIT_OK = 0
EXIT_VIOLATION = 2
EXIT_ERROR = 3

# The loop wakes at least this often to see a signal's flag: a signal wake-up
# pipe would be two more descriptors, and the socket is to be the only one.
TICK_MS = 250
# REOPEN: a burst of this many, then one every REOPEN_EVERY seconds (the parent backs
# off up to 5 s between attempts; anything faster is not a parent reconnecting).
REOPEN_BURST = 4
REOPEN_EVERY = 2.0


class State(enum.Enum):
    THAWED = "thawed"
    FROZEN = "frozen"
    AUTO_THAWED = "auto-thawed"


PERMITTED: dict[State, frozenset[Op]] = {
    State.THAWED: frozenset({Op.CHECK, Op.FREEZE, Op.PING, Op.QUIT, Op.REOPEN}),
    State.FROZEN: frozenset({Op.THAW, Op.PING}),
    State.AUTO_THAWED: frozenset({Op.THAW, Op.PING}),
}


class Quit(Exception):
    pass


@dataclass
class Child:
    channel: Channel
    freezer: Freezer
    cfg: ChildConfig
    device: str | None
    statedir: StateDir
    budget: Bucket
    clock: Callable[[], float] = time.monotonic
    state: State = State.THAWED
    held: list[Held] = field(default_factory=list)
    frozen_since: float = 0.0  # stamped before the first flush of the last FREEZE
    deadline: float = 0.0  # the watchdog's, for the filesystems held now
    device_identity: Identity | None = None  # what REOPEN may open: the device at start-up
    reopens: Bucket = field(default_factory=lambda: Bucket(REOPEN_BURST, 1 / REOPEN_EVERY,
                                                          REOPEN_BURST, time.monotonic()))
    recovered: int = 0  # filesystems thawed at start-up from a predecessor's crash record
    expedite: Expedite | None = None  # [freeze] rcu_expedited (Linux)
    next_seq: int = 1
    signals: list[int] = field(default_factory=list)  # appended to by the signal handler

    # --- the loop ------------------------------------------------------------

    def serve(self) -> None:
        poller = select.poll()
        poller.register(self.channel.fileno(), select.POLLIN)
        while True:
            timeout_ms = TICK_MS
            if self.state is State.FROZEN:
                left = self.deadline - self.clock()
                timeout_ms = min(TICK_MS, max(0, int(left * 1000) + 1))
            ready = dict(poller.poll(timeout_ms))
            if self.signals:
                self.auto_thaw(wire.Reason.SIGNAL)
                log.info("stopping on signal %d", self.signals[0])
                return
            if self.state is State.FROZEN and self.clock() >= self.deadline:
                self.auto_thaw(wire.Reason.WATCHDOG)
            if self.channel.fileno() in ready:
                frame = self.channel.receive()
                if frame is None:
                    if self.held:
                        log.warning("parent closed the channel while frozen: thawing")
                    return
                try:
                    self.handle(frame)
                except Quit:
                    return

    def handle(self, frame: bytes) -> None:
        try:
            req = wire.decode_request(frame)
        except wire.WireError as e:
            raise ProtocolViolation(str(e)) from None
        if req.seq != self.next_seq:
            raise ProtocolViolation(f"sequence {req.seq}, expected {self.next_seq}")
        self.next_seq = (self.next_seq + 1) & 0xFFFFFFFF
        if req.op not in PERMITTED[self.state]:
            raise ProtocolViolation(f"{req.op.name} is not permitted while {self.state.value}")
        HANDLERS[req.op](self, req)

    def answer(self, req: wire.Request, status: Status, *, err: int = 0, count: int = 0,
               elapsed_us: int = 0, mount: str = "", fds: tuple[int, ...] = ()) -> None:
        res = wire.Result(req.op, status, req.seq, err, count, elapsed_us, mount)
        self.channel.send(wire.encode_result(res), fds)

    # --- handlers: one per request ---------------------------------------------

    def selection(self) -> Selection:
        sel = select_targets(self.freezer.mounts(), self.cfg, self.freezer.platform)
        crash_only: dict[str, list[str]] = {}  # one line per reason, however many datasets
        for d in sel.decisions:
            if d.verdict is Verdict.CRASH_ONLY:
                crash_only.setdefault(d.reason, []).append(d.mount.mountpoint)
            elif d.verdict is not Verdict.IGNORE:
                log.debug("%s: %s", d.mount.mountpoint, d.verdict.value)
        for reason, mountpoints in crash_only.items():
            log.info("%s: %s", reason, ", ".join(mountpoints))
        return sel

    def blocker(self, sel: Selection) -> tuple[str, str] | None:
        veto = sel.veto_reason()
        if veto:
            return veto
        for m in sel.targets if self.statedir.enabled else ():
            if under(self.statedir.real, m.mountpoint):
                return m.mountpoint, (f"holds the state directory {self.statedir.path}; "
                                      "set [state] dir to a path on tmpfs such as /run")
        return None

    def handle_check(self, req: wire.Request) -> None:
        sel = self.selection()
        veto = self.blocker(sel)
        if veto:
            log.warning("CHECK vetoed by %s: %s", *veto)
            self.answer(req, Status.REFUSED, err=errno.EPERM, count=len(sel.targets),
                        mount=veto[0])
            return
        log.info("CHECK: %d filesystem(s) can be frozen: %s", len(sel.targets),
                 ", ".join(m.mountpoint for m in sel.targets) or "none")
        self.answer(req, Status.OK, count=len(sel.targets))

    def handle_freeze(self, req: wire.Request) -> None:
        window = self.cfg.watchdog.max_frozen_seconds
        threads = thread_count()
        if threads != 1:
            log.error("FREEZE refused: this process has %d threads, not 1", threads)
            self.answer(req, Status.FAILED, err=errno.EDEADLK)
            return
        sel = self.selection()
        veto = self.blocker(sel)
        if veto:
            log.warning("FREEZE refused, %s: %s", *veto)
            self.answer(req, Status.REFUSED, err=errno.EPERM, mount=veto[0])
            return
        start = self.clock()
        if not self.budget.take(window, start):
            wait = self.budget.seconds_until(window, start)
            log.warning("FREEZE refused: the frozen-time budget holds %.1f s, a freeze needs "
                        "%.1f s ([watchdog] max_frozen_seconds); %s", self.budget.left, window,
                        f"enough again in {wait:.0f} s" if wait < float("inf") else
                        "it does not refill ([watchdog] budget_seconds_per_hour = 0)")
            self.answer(req, Status.REFUSED, err=errno.EAGAIN)
            return
        self.budget.save(self.statedir)  # spent before anything is frozen: a crash keeps it
        self.statedir.write([(m.fs_key, m.mountpoint) for m in sel.targets])
        self.frozen_since, self.deadline = start, start + window
        if self.expedite is not None:
            try:
                self.expedite.on(self.statedir.note_rcu)
            except OSError as e:  # nothing is frozen yet: say so, and freeze as usual
                log.warning("[freeze] rcu_expedited: cannot set it: %s", e.strerror or e)
        try:
            held = freeze_all(self.freezer, sel.targets, presync=self.cfg.freeze.presync,
                              deadline=self.deadline, clock=self.clock, levels=sel.levels,
                              at_deadline=self.unexpedite)
        except FreezeFailed as e:
            self.unexpedite()
            self.statedir.clear()
            self.refund()
            # Logged only now, after the rollback: never while anything is frozen.
            log.error("FREEZE failed on %s (%s); everything thawed again", e.mountpoint, e.why)
            self.answer(req, Status.FAILED, err=e.errno, mount=e.mountpoint,
                        elapsed_us=int((self.clock() - start) * 1e6))
            return
        finally:
            self.unexpedite()
        elapsed_us = int((self.clock() - start) * 1e6)
        for h in held:
            if h.fd is None:
                self.statedir.drop(h.fs_key)
        self.held = held
        self.state = State.FROZEN
        # The mount field names what is frozen, for the parent's status (clipped by the wire).
        self.answer(req, Status.OK, count=len(held), elapsed_us=elapsed_us,
                    mount=", ".join(h.mountpoint for h in held))
        for h in held:
            if h.fd is None:
                log.warning("%s was already frozen by someone else: counted, and left to them",
                            h.mountpoint)
        log.info("FROZEN: %s", ", ".join(h.mountpoint for h in held) or "nothing")

    def unexpedite(self) -> None:
        """Back to the system's own RCU setting (if we changed it), at once."""
        if self.expedite is not None:
            self.expedite.off(self.statedir.rcu_restored)

    def refund(self) -> None:
        """Give back the part of the last FREEZE's window that was not spent frozen."""
        now = self.clock()
        unused = self.deadline - max(now, self.frozen_since)
        self.budget.give_back(unused, now)
        self.budget.save(self.statedir)

    def thaw_held(self) -> tuple[int, list[str]]:
        held, self.held = self.held, []
        problems = thaw(self.freezer, held)
        self.statedir.clear()
        self.refund()
        return len(held), problems

    def handle_thaw(self, req: wire.Request) -> None:
        if self.state is State.AUTO_THAWED:
            self.state = State.THAWED
            self.answer(req, Status.OK, count=0)
            return
        start = self.clock()
        count, problems = self.thaw_held()
        elapsed_us = int((self.clock() - start) * 1e6)
        self.state = State.THAWED
        hard = [p for p in problems if "already thawed" not in p]
        if hard:
            self.answer(req, Status.FAILED, err=errno.EIO, count=count, elapsed_us=elapsed_us,
                        mount=hard[0].split(":")[0])
        else:
            self.answer(req, Status.OK, count=count, elapsed_us=elapsed_us)
        for p in problems:
            log.warning("THAW: %s", p)
        log.info("THAWED %d filesystem(s)", count)

    def handle_ping(self, req: wire.Request) -> None:
        self.answer(req, Status.OK, count=len(self.held))

    def handle_quit(self, req: wire.Request) -> None:
        self.answer(req, Status.OK)
        raise Quit

    def handle_reopen(self, req: wire.Request) -> None:
        if self.device is None or self.device_identity is None:
            self.answer(req, Status.FAILED, err=errno.ENODEV)
            return
        if not self.reopens.take(1, self.clock()):
            log.warning("REOPEN refused: more than %d in a row, then one every %g s",
                        REOPEN_BURST, REOPEN_EVERY)
            self.answer(req, Status.REFUSED, err=errno.EAGAIN)
            return
        try:
            fd = open_device(self.device, self.device_identity)
        except OSError as e:
            log.warning("REOPEN of %s failed: %s", self.device, e.strerror or e)
            self.answer(req, Status.FAILED, err=e.errno or errno.EIO)
            return
        try:
            self.answer(req, Status.OK, fds=(fd,))
        finally:
            os.close(fd)

    def auto_thaw(self, reason: wire.Reason) -> None:
        """Thaw without being asked (watchdog or signal), and tell the parent."""
        if self.state is not State.FROZEN:
            return
        count, problems = self.thaw_held()
        self.state = State.AUTO_THAWED
        event = wire.Event(wire.EventCode.AUTO_THAW, reason, count)
        try:
            self.channel.send(wire.encode_event(event))
        except (ProtocolViolation, OSError):
            pass  # the parent is not listening; thawing was what mattered
        why = ("watchdog: frozen longer than [watchdog] max_frozen_seconds"
               if reason is wire.Reason.WATCHDOG else "signal")
        log.warning("automatic THAW of %d filesystem(s) (%s)", count, why)
        for p in problems:
            log.warning("THAW: %s", p)

    def shutdown(self) -> None:
        """Every exit path: thaw what we hold.  Never raises."""
        try:
            if self.held:
                count, problems = self.thaw_held()
                log.warning("thawed %d filesystem(s) on the way out", count)
                for p in problems:
                    log.warning("THAW: %s", p)
        except Exception as e:
            log.error("thaw on exit failed: %s", e)


HANDLERS: dict[Op, Callable[[Child, wire.Request], None]] = {
    Op.CHECK: Child.handle_check,
    Op.FREEZE: Child.handle_freeze,
    Op.THAW: Child.handle_thaw,
    Op.PING: Child.handle_ping,
    Op.QUIT: Child.handle_quit,
    Op.REOPEN: Child.handle_reopen,
}


def pick_freezer(memory: bool = False) -> Freezer:
    """The one place the child asks which system it is on."""
    if memory:
        if os.geteuid() == 0:
            raise OSError("the in-memory freezer is refused to root")
        from privileged.freeze_memory import MemoryFreezer

        return MemoryFreezer()
    if sys.platform.startswith("freebsd"):
        from privileged.freeze_freebsd import FreeBSDFreezer

        return FreeBSDFreezer()
    from privileged.freeze_linux import LinuxFreezer

    return LinuxFreezer()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hv-vss-agent-child", add_help=False)
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--ppid", type=int, required=True)
    p.add_argument("--config")
    p.add_argument("--device")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--memory", action="store_true")  # demo without root; refused to root
    return p.parse_args(argv)


def start(args: argparse.Namespace, channel: Channel, stop: list[int]) -> Child:
    """Config, state files, crash recovery, budget: everything before the sandbox."""
    if args.config is not None and not os.path.isabs(args.config):
        raise ConfigError(f"config file {args.config}: not an absolute path")
    cfg = load_child_config(args.config)
    for path in cfg.freeze.only:
        # Names, not identities: whoever may rename a directory above a mountpoint may
        # exchange what is mounted there with another of their mounts (never follow a
        # symlink there: opens are checked against the mount table, freezer.py).  A path
        # that is not there is for selection to say.
        reason = os.path.lexists(path) and directories_reason(path, links=True)
        if reason:
            log.warning("[freeze] only %s: %s", path, reason)
    freezer = pick_freezer(args.memory)
    statedir = StateDir(cfg.state.dir, enabled=freezer.platform.freeze_outlives_holder)
    statedir.open()
    device_identity = identify(args.device) if args.device else None

    # Before anything else: thaw what a killed predecessor left frozen.  Its freeze
    # window was taken from the budget before it froze, so the budget is right as it is.
    recovered = 0
    records, rcu_left = statedir.read(), statedir.read_rcu()
    if records:
        for note in freezer.recover(records):
            log.warning("recovery: %s", note)
            recovered += note.startswith("thawed")
    if rcu_left is not None:
        try:
            log.warning("recovery: %s", recover_rcu(rcu_left))
        except OSError as e:
            log.error("recovery: cannot restore %s to %s: %s", RCU_PATH, rcu_left,
                      e.strerror or e)
    if records or rcu_left is not None:
        statedir.clear()
    expedite = None
    if cfg.freeze.rcu_expedited:
        if freezer.platform.freeze_outlives_holder:  # Linux
            expedite = Expedite.open()
        else:
            log.warning("[freeze] rcu_expedited is for Linux only: ignored")
    watchdog = cfg.watchdog
    budget = Bucket.load(statedir, watchdog.budget_seconds, watchdog.budget_seconds_per_hour,
                         time.monotonic())
    return Child(channel, freezer, cfg, args.device, statedir, budget, signals=stop,
                 device_identity=device_identity, recovered=recovered, expedite=expedite)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        harden_child(args.ppid)
    except OSError as e:  # stderr is still the parent's: one line there
        sys.stderr.write(f"hv-vss-agent child: cannot start: {e.strerror or e}\n")
        return EXIT_ERROR
    sock = socket.socket(fileno=args.fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        return EXIT_ERROR
    sock.set_inheritable(False)
    channel = Channel(sock)
    root = logging.getLogger()
    root.handlers[:] = [FrameLogHandler(channel)]
    root.setLevel(logging.DEBUG if args.debug else logging.INFO)
    quiet_stdio()  # from here on, errors travel as LOG frames

    stop: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop.append(signum)  # only a flag; the loop does the work

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)

    try:
        child = start(args, channel, stop)
    except (ConfigError, OSError) as e:
        log.error("cannot start: %s", e)
        return EXIT_ERROR
    try:
        confined = confine_child(args.device)
        (log.info if "Landlock ABI" in confined else log.warning)("confined: %s", confined)
    except OSError as e:
        log.error("cannot start: %s", e)
        return EXIT_ERROR
    try:
        targets = len(child.selection().targets)
        channel.send(wire.encode_hello(wire.Hello(os.getpid(), targets, child.recovered)))
        child.serve()
        return EXIT_OK
    except ProtocolViolation as e:
        child.shutdown()
        log.error("protocol violation, exiting: %s", e)
        return EXIT_VIOLATION
    except Exception as e:
        child.shutdown()
        log.error("internal error, exiting: %s: %s", type(e).__name__, e)
        return EXIT_ERROR
    finally:
        child.shutdown()
