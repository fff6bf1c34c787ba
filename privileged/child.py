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
thaw guard (freezer.py) keeps it while freezing, the loop below keeps it
afterwards.  The frozen-time budget (budget.py) decides whether a FREEZE may
start at all.

What the child imports is kept to what it needs: no logging, argparse, enum
or dataclasses (each would load a dozen or more standard modules into root);
its log lines travel to the parent as LOG records, and the parent writes them.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal's C half, without enum
import _socket
import errno
import os
import select
import sys
import time

from privileged import protocol as p
from privileged import records
from privileged.budget import Bucket
from privileged.child_config import ChildConfig, ConfigError, parse_child_sections, read_config
from privileged.device import Identity, identify, open_device
from privileged.freezer import FreezeFailed, Guard, Held, freeze_all, thaw
from privileged.hardening import harden_child, quiet_stdio, thread_count
from privileged.safe_path import directories_reason
from privileged.selection import Selection, Verdict, select_targets, under
from privileged.statefile import StateDir
from privileged.system import LINUX
from privileged.toml_subset import parse_toml

if LINUX:
    from privileged.freeze_linux import LinuxFreezer as NativeFreezer
    from privileged.rcu import PATH as RCU_PATH  # [freeze] rcu_expedited: Linux only
    from privileged.rcu import Expedite
    from privileged.rcu import recover as recover_rcu
    from privileged.sandbox import confine_child
else:
    from privileged.freeze_freebsd import FreeBSDFreezer as NativeFreezer  # type: ignore[assignment]

    def confine_child(device: str | None) -> str:
        """No sandbox: the child opens /dev/ufssuspend once per filesystem at FREEZE time,
        which Capsicum's capability mode forbids (SECURITY.md, Known limits)."""
        return "no sandbox on this system"

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from privileged.freezer import Freezer

EXIT_OK, EXIT_VIOLATION, EXIT_ERROR = 0, 2, 3
# The loop wakes at least this often to see a signal's flag: a signal wake-up
# pipe would be two more descriptors, and the socket is to be the only one.
TICK_MS = 250
# REOPEN: a burst of this many, then one every REOPEN_EVERY seconds (the parent backs
# off up to 5 s between attempts; anything faster is not a parent reconnecting).
REOPEN_BURST, REOPEN_EVERY = 4, 2.0
THAWED, FROZEN, AUTO_THAWED = "thawed", "frozen", "auto-thawed"
PERMITTED = {
    THAWED: frozenset({p.CHECK, p.FREEZE, p.PING, p.QUIT, p.REOPEN}),
    FROZEN: frozenset({p.THAW, p.PING}),
    AUTO_THAWED: frozenset({p.THAW, p.PING}),
}


class ProtocolViolation(Exception):
    pass


class Quit(Exception):
    pass


class GuardGone(Exception):
    pass


class _Log:
    sock: _socket.socket | None = None  # once the channel is up
    threshold = p.INFO
    dropped = 0


def log(level: int, text: str) -> None:
    """One line of the child's log, sent to the parent as a LOG record.  Never blocks: a
    line the parent has no room for is dropped (and counted)."""
    if level >= _Log.threshold and _Log.sock is not None:
        try:
            _Log.dropped += not records.send(_Log.sock, p.log(level, text), block=False)
        except OSError:
            pass  # the parent is gone; the loop will see EOF


class Child:
    def __init__(self, sock: _socket.socket, freezer: Freezer, cfg: ChildConfig,
                 statedir: StateDir, budget: Bucket, *, device: str | None = None,
                 device_identity: Identity | None = None, recovered: int = 0,
                 expedite: Expedite | None = None, signals: list[int] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sock, self.freezer, self.cfg, self.device = sock, freezer, cfg, device
        self.statedir, self.budget, self.clock = statedir, budget, clock
        self.device_identity = device_identity  # what REOPEN may open: the device at start-up
        # Filesystems thawed from a predecessor's crash record; [freeze] rcu_expedited (Linux).
        self.recovered, self.expedite = recovered, expedite
        self.signals = signals if signals is not None else []  # the signal handler's flags
        self.state, self.next_seq = THAWED, 1
        self.held: list[Held] = []
        self.frozen_since = 0.0  # stamped before the first flush of the last FREEZE
        self.deadline = 0.0  # the watchdog's, for the filesystems held now
        self.reopens = Bucket(REOPEN_BURST, 1 / REOPEN_EVERY, REOPEN_BURST, clock())
        self.verdict = ""  # the last CHECK's yes, as logged
        self.said: dict[str, str] = {}  # the last selection's crash-only lines, by reason
        self.guard: Guard | None = None  # forked by main() before it confines the child

    # --- the loop ------------------------------------------------------------

    def serve(self) -> None:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        if self.guard is not None:  # it sends nothing unasked: anything is its EOF
            poller.register(self.guard.sock.fileno(), select.POLLIN)
        while True:
            timeout = TICK_MS
            if self.state == FROZEN:
                timeout = min(TICK_MS, max(0, int((self.deadline - self.clock()) * 1000) + 1))
            ready = poller.poll(timeout)
            if self.signals:
                self.auto_thaw(p.SIGNAL)
                log(p.INFO, f"stopping on signal {self.signals[0]}")
                return
            if self.state == FROZEN and self.clock() >= self.deadline:
                self.auto_thaw(p.WATCHDOG)
            if self.guard is not None and any(fd == self.guard.sock.fileno() for fd, _ in ready):
                raise GuardGone("the thaw guard is gone: exiting, to be started again with "
                                "a new one")
            if ready:
                try:
                    record, _ = records.receive(self.sock, p.MAX_RECORD, drain=False)
                except records.RecordError as e:
                    raise ProtocolViolation(f"the parent sent {e}") from None
                if not record:
                    if self.held:
                        log(p.WARNING, "parent closed the channel while frozen: thawing")
                    return
                try:
                    self.handle(record)
                except Quit:
                    return

    def handle(self, record: bytes) -> None:
        try:
            op, seq = p.decode_request(record)
        except p.WireError as e:
            raise ProtocolViolation(str(e)) from None
        if seq != self.next_seq:
            raise ProtocolViolation(f"sequence {seq}, expected {self.next_seq}")
        self.next_seq = (self.next_seq + 1) & 0xFFFFFFFF
        if op not in PERMITTED[self.state]:
            raise ProtocolViolation(f"{p.OP_NAMES[op]} is not permitted while {self.state}")
        HANDLERS[op](self, op, seq)

    def answer(self, op: int, seq: int, status: int, *, err: int = 0, count: int = 0,
               elapsed_us: int = 0, mount: str = "", fds: tuple[int, ...] = ()) -> None:
        record = p.result(op, status, seq, err=err, count=count, elapsed_us=elapsed_us,
                          mount=mount)
        if not records.send(self.sock, record, fds, block=False):
            raise ProtocolViolation("the parent is not reading its answers")

    # --- handlers: one per request ---------------------------------------------

    def selection(self) -> Selection:
        sel = select_targets(self.freezer.mounts(reuse=True), self.cfg, self.freezer.platform)
        crash_only: dict[str, list[str]] = {}  # one line per reason, however many datasets
        for d in sel.decisions:
            if d.verdict is Verdict.CRASH_ONLY:
                crash_only.setdefault(d.reason, []).append(d.mount.mountpoint)
            elif d.verdict is not Verdict.IGNORE:
                log(p.DEBUG, f"{d.mount.mountpoint}: {d.verdict}")
        said = {reason: f"{reason}: {', '.join(mps)}" for reason, mps in crash_only.items()}
        for reason, text in said.items():  # at INFO when it is news (see handle_check)
            log(p.INFO if self.said.get(reason) != text else p.DEBUG, text)
        self.said = said
        return sel

    def blocker(self, sel: Selection) -> tuple[str, str] | None:
        """Why CHECK must say no and FREEZE must not start: (mountpoint, why), if any."""
        for m in sel.targets if self.statedir.enabled else ():
            if under(self.statedir.real, m.mountpoint):
                return m.mountpoint, (f"holds the state directory {self.statedir.path}; "
                                      "set [state] dir to a path on tmpfs such as /run")
        return sel.veto_reason()

    def handle_check(self, op: int, seq: int) -> None:
        sel = self.selection()
        veto = self.blocker(sel)
        if veto:  # the host first, then the log
            self.answer(op, seq, p.REFUSED, err=errno.EPERM, count=len(sel.targets),
                        mount=veto[0])
            log(p.WARNING, f"CHECK vetoed by {veto[0]}: {veto[1]}")
            self.verdict = ""
            return
        self.answer(op, seq, p.OK, count=len(sel.targets))
        verdict = (f"CHECK: {len(sel.targets)} filesystem(s) can be frozen: "
                   f"{', '.join(m.mountpoint for m in sel.targets) or 'none'}")
        # Every veto, but a yes only when it is news: the parent writes each line it is
        # sent, between one host request and the next (CHECKs back to back took 30% longer).
        log(p.INFO if verdict != self.verdict else p.DEBUG, verdict)
        self.verdict = verdict

    def handle_freeze(self, op: int, seq: int) -> None:
        window = self.cfg.watchdog.max_frozen_seconds
        threads = thread_count()
        if threads != 1:
            log(p.ERROR, f"FREEZE refused: this process has {threads} threads, not 1")
            self.answer(op, seq, p.FAILED, err=errno.EDEADLK)
            return
        sel = self.selection()
        veto = self.blocker(sel)
        if veto:
            log(p.WARNING, f"FREEZE refused, {veto[0]}: {veto[1]}")
            self.answer(op, seq, p.REFUSED, err=errno.EPERM, mount=veto[0])
            return
        start = self.clock()
        if not self.budget.take(window, start):
            wait = self.budget.seconds_until(window, start)
            log(p.WARNING, f"FREEZE refused: the frozen-time budget holds {self.budget.left:.1f} "
                           f"s, a freeze needs {window:.1f} s ([watchdog] max_frozen_seconds); "
                           + (f"enough again in {wait:.0f} s" if wait < float("inf") else
                              "it does not refill ([watchdog] budget_seconds_per_hour = 0)"))
            self.answer(op, seq, p.REFUSED, err=errno.EAGAIN)
            return
        self.budget.save(self.statedir)  # spent before anything is frozen: a crash keeps it
        self.statedir.write([(m.fs_key, m.mountpoint) for m in sel.targets])
        self.frozen_since, self.deadline = start, start + window
        if self.expedite is not None:
            try:
                self.expedite.on(self.statedir.note_rcu)
            except OSError as e:  # nothing is frozen yet: say so, and freeze as usual
                log(p.WARNING, f"[freeze] rcu_expedited: cannot set it: {e.strerror or e}")
        try:
            self.held = freeze_all(self.freezer, self.guard, sel.targets,
                                   presync=self.cfg.freeze.presync
                                   and self.freezer.worth_flushing(), deadline=self.deadline,
                                   clock=self.clock, levels=sel.levels,
                                   at_deadline=self.unexpedite)
        except FreezeFailed as e:
            self.unexpedite()
            self.statedir.clear()
            self.refund()
            # Logged only now, after the rollback: never while anything is frozen.
            log(p.ERROR, f"FREEZE failed on {e.mountpoint} ({e.why}); everything thawed again")
            self.answer(op, seq, p.FAILED, err=e.errno, mount=e.mountpoint,
                        elapsed_us=int((self.clock() - start) * 1e6))
            return
        finally:
            self.unexpedite()
        elapsed_us = int((self.clock() - start) * 1e6)
        theirs = [h for h in self.held if h.fd is None]  # frozen by someone else: not ours
        for h in theirs:
            self.statedir.drop(h.fs_key)
        self.state = FROZEN
        # The mount field lists what is frozen, for the parent's status (clipped by the wire).
        names = [h.mountpoint for h in self.held]
        self.answer(op, seq, p.OK, count=len(names), elapsed_us=elapsed_us, mount="\0".join(names))
        for h in theirs:
            log(p.WARNING, f"{h.mountpoint} was already frozen by someone else: counted, and "
                           "left to them")
        log(p.INFO, f"FROZEN: {', '.join(names) or 'nothing'}")

    def unexpedite(self) -> None:
        """Back to the system's own RCU setting (if we changed it), at once."""
        if self.expedite is not None:
            self.expedite.off(self.statedir.rcu_restored)

    def refund(self) -> None:
        """Give back the part of the last FREEZE's window that was not spent frozen."""
        now = self.clock()
        self.budget.give_back(self.deadline - max(now, self.frozen_since), now)
        self.budget.save(self.statedir)

    def thaw_held(self, why: str) -> list[str]:
        """Thaw what is held; the problems, each also logged with `why`."""
        held, self.held = self.held, []
        problems = thaw(self.freezer, held)
        self.statedir.clear()
        self.refund()
        for problem in problems:
            log(p.WARNING, f"{why}: {problem}")
        return problems

    def handle_thaw(self, op: int, seq: int) -> None:
        if self.state == AUTO_THAWED:  # thawed already; the parent catches up
            self.state = THAWED
            self.answer(op, seq, p.OK)
            return
        start, count = self.clock(), len(self.held)
        hard = [problem for problem in self.thaw_held("THAW") if "already thawed" not in problem]
        self.state = THAWED
        elapsed_us = int((self.clock() - start) * 1e6)
        if hard:
            self.answer(op, seq, p.FAILED, err=errno.EIO, count=count, elapsed_us=elapsed_us,
                        mount=hard[0].split(":")[0])
        else:
            self.answer(op, seq, p.OK, count=count, elapsed_us=elapsed_us)
        log(p.INFO, f"THAWED {count} filesystem(s)")

    def handle_ping(self, op: int, seq: int) -> None:
        self.answer(op, seq, p.OK, count=len(self.held))

    def handle_quit(self, op: int, seq: int) -> None:
        self.answer(op, seq, p.OK)
        raise Quit

    def handle_reopen(self, op: int, seq: int) -> None:
        if self.device is None or self.device_identity is None:
            self.answer(op, seq, p.FAILED, err=errno.ENODEV)
            return
        if not self.reopens.take(1, self.clock()):
            log(p.WARNING, f"REOPEN refused: more than {REOPEN_BURST} in a row, then one every "
                           f"{REOPEN_EVERY:g} s")
            self.answer(op, seq, p.REFUSED, err=errno.EAGAIN)
            return
        try:
            fd = open_device(self.device, self.device_identity)
        except OSError as e:
            log(p.WARNING, f"REOPEN of {self.device} failed: {e.strerror or e}")
            self.answer(op, seq, p.FAILED, err=e.errno or errno.EIO)
            return
        try:
            self.answer(op, seq, p.OK, fds=(fd,))
        finally:
            os.close(fd)

    def auto_thaw(self, reason: int) -> None:
        """Thaw without being asked (watchdog or signal), and tell the parent."""
        if self.state != FROZEN:
            return
        count = len(self.held)
        self.thaw_held("THAW")
        self.state = AUTO_THAWED
        try:
            records.send(self.sock, p.event(reason, count), block=False)
        except OSError:
            pass  # the parent is not listening; thawing was what mattered
        log(p.WARNING, f"automatic THAW of {count} filesystem(s) (" + (
            "watchdog: frozen longer than [watchdog] max_frozen_seconds"
            if reason == p.WATCHDOG else "signal") + ")")

    def shutdown(self) -> None:
        """Every exit path: thaw what we hold, then let the guard go.  Never raises."""
        try:
            if self.held:
                count = len(self.held)
                self.thaw_held("THAW")
                log(p.WARNING, f"thawed {count} filesystem(s) on the way out")
        except Exception as e:
            log(p.ERROR, f"thaw on exit failed: {e}")
        guard, self.guard = self.guard, None
        if guard is not None:
            guard.close()


HANDLERS: dict[int, Callable[[Child, int, int], None]] = {
    p.CHECK: Child.handle_check,
    p.FREEZE: Child.handle_freeze,
    p.THAW: Child.handle_thaw,
    p.PING: Child.handle_ping,
    p.QUIT: Child.handle_quit,
    p.REOPEN: Child.handle_reopen,
}


def pick_freezer(memory: bool = False) -> Freezer:
    """This system's freezer, or the demo's stand-in (which is refused to root)."""
    if not memory:
        return NativeFreezer()
    if os.geteuid() == 0:
        raise OSError(errno.EPERM, "the in-memory freezer is refused to root")
    from privileged.freeze_memory import MemoryFreezer

    return MemoryFreezer()


def parse_args(argv: list[str]) -> dict[str, str]:
    """--fd N --ppid N [--config PATH] [--device PATH] [--debug] [--memory], as root's
    command line gives them (agent/child_link.py); anything else is a ValueError."""
    args, words = {}, iter(argv)
    for word in words:
        if word in ("--debug", "--memory"):
            args[word] = ""
        elif word in ("--fd", "--ppid", "--config", "--device"):
            args[word] = next(words, "")
        else:
            raise ValueError(f"unknown argument {word!r}")
    if not args.get("--fd", "").isdigit() or not args.get("--ppid", "").isdigit():
        raise ValueError("--fd and --ppid are required")
    return args


def start(args: dict[str, str], sock: _socket.socket, stop: list[int]) -> Child:
    """Config, state files, crash recovery, budget: everything before the sandbox."""
    path = args.get("--config")
    cfg = parse_child_sections(parse_toml(read_config(path), path)) if path else ChildConfig()
    for only in cfg.freeze.only:
        # Names, not identities: whoever may rename a directory above a mountpoint may
        # exchange what is mounted there with another of their mounts (never follow a
        # symlink there: opens are checked against the mount table, freeze_linux.py).  A
        # path that is not there is for selection to say.
        reason = os.path.lexists(only) and directories_reason(only, links=True)
        if reason:
            log(p.WARNING, f"[freeze] only {only}: {reason}")
    freezer = pick_freezer("--memory" in args)
    statedir = StateDir(cfg.state.dir, enabled=freezer.platform.freeze_outlives_holder)
    statedir.open()
    device = args.get("--device")
    device_identity = identify(device) if device else None

    # Before anything else: thaw what a killed predecessor left frozen.  Its freeze
    # window was taken from the budget before it froze, so the budget is right as it is.
    recovered = 0
    crashed, rcu_left = statedir.read(), statedir.read_rcu()
    if crashed:
        for note in freezer.recover(crashed):
            log(p.WARNING, f"recovery: {note}")
            recovered += note.startswith("thawed")
    if rcu_left is not None:
        try:
            log(p.WARNING, f"recovery: {recover_rcu(rcu_left)}")
        except OSError as e:
            log(p.ERROR, f"recovery: cannot restore {RCU_PATH} to {rcu_left}: "
                         f"{e.strerror or e}")
    if crashed or rcu_left is not None:
        statedir.clear()
    expedite = None
    if cfg.freeze.rcu_expedited:
        if freezer.platform.freeze_outlives_holder:  # Linux
            expedite = Expedite.open()
        else:
            log(p.WARNING, "[freeze] rcu_expedited is for Linux only: ignored")
    budget = Bucket.load(statedir, cfg.watchdog.budget_seconds,
                         cfg.watchdog.budget_seconds_per_hour, time.monotonic())
    return Child(sock, freezer, cfg, statedir, budget, device=device, signals=stop,
                 device_identity=device_identity, recovered=recovered, expedite=expedite)


def devices(targets: list[str]) -> list[int]:
    """The device numbers (st_dev) of these mountpoints, for HELLO."""
    found = []
    for mountpoint in targets:
        try:
            found.append(os.lstat(mountpoint).st_dev)
        except OSError:
            pass
    return found


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        harden_child(int(args["--ppid"]))
        sock = _socket.socket(fileno=int(args["--fd"]))
        if (sock.family, sock.type) != (_socket.AF_UNIX, _socket.SOCK_SEQPACKET):
            raise OSError(errno.ENOTSOCK, "--fd is not a SOCK_SEQPACKET Unix socket")
    except (OSError, ValueError) as e:  # stderr is still the parent's: one line there
        sys.stderr.write(f"hv-vss-agent child: cannot start: {getattr(e, 'strerror', 0) or e}\n")
        return EXIT_ERROR
    os.set_inheritable(sock.fileno(), False)
    _Log.sock, _Log.threshold = sock, p.DEBUG if "--debug" in args else p.INFO
    guard_link = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)  # above 0-2
    quiet_stdio()  # from here on, errors travel as LOG records

    stop: list[int] = []
    for s in (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP):
        _signal.signal(s, lambda signum, _frame: stop.append(signum))  # the loop does the work
    try:
        child = start(args, sock, stop)
        # Forked before the filter, which then refuses any fork: the guard confines itself.
        child.guard = Guard(guard_link, child.freezer.release,
                            lambda: confine_child(child.device))
        confined = confine_child(child.device)
        log(p.INFO if "Landlock ABI" in confined else p.WARNING, f"confined: {confined}")
    except (ConfigError, OSError) as e:
        log(p.ERROR, f"cannot start: {e}")
        return EXIT_ERROR
    try:
        targets = [m.mountpoint for m in child.selection().targets]
        hello = p.hello(os.getpid(), len(targets), child.recovered, devices(targets))
        if not records.send(sock, hello, block=False):
            raise ProtocolViolation("the parent is not reading")
        child.serve()
        return EXIT_OK
    except ProtocolViolation as e:
        child.shutdown()
        log(p.ERROR, f"protocol violation, exiting: {e}")
        return EXIT_VIOLATION
    except Exception as e:
        child.shutdown()
        log(p.ERROR, f"internal error, exiting: {type(e).__name__}: {e}")
        return EXIT_ERROR
    finally:
        child.shutdown()
