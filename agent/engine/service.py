"""The unprivileged parent's event loop: kernel channel, child link, subscribers.

All decisions are the engine's; this module moves bytes and keeps time.
While a transaction is open the kernel descriptor is not read: the drivers
send one request at a time, and the next one waits in the kernel.

The child dying ends the service: a pending kernel request is answered
HV_E_FAIL, and we exit non-zero so the service manager restarts the pair
(the new child thaws whatever its predecessor's crash record names).  The
frontend dying, or breaking its protocol, ends it the same way: it faces
untrusted clients, so we do not guess what state it was left in.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from typing import Protocol

from agent.engine import machine as E
from agent.engine.child_link import ChildGone, ChildLink
from agent.engine.freeze_gate import FreezeGate
from agent.kernel.channel import KernelChannel, KernelLost, KernelProtocolError
from agent.kernel.protocol import KernelProtocol
from agent.kernel.transport import attach
from agent.protocols.frontend import Done
from agent.protocols.verb import Verb
from agent.sandbox import limit_device
from privileged import wire

log = logging.getLogger("hv-vss-agent")

EXIT_OK = 0
EXIT_CHILD_DIED = 3
EXIT_FRONTEND_DIED = 4
EXIT_ENGINE_LOST_TRACK = 5

BACKOFF_START = 0.1
BACKOFF_MAX = 5.0
PUBLISH_AFTER = 0.05  # seconds at most between a change and the status showing it
PUBLISH_QUIET = 0.005  # seconds without a change before the status is published


class FrontendGone(Exception):
    """The frontend closed its link, died, or sent something malformed."""


class Notifier(Protocol):
    """The frontend that speaks to subscribers (agent/engine/frontend_link.py).

    Its methods raise FrontendGone when the frontend can no longer be trusted."""

    def fileno(self) -> int: ...
    def notify(self, event: Verb, txid: int, deadline: float) -> bool: ...
    def receive(self) -> list[Done]: ...
    def publish(self, status: dict[str, object]) -> None: ...


class Service:
    def __init__(self, engine: E.Engine, child: ChildLink, gate: FreezeGate, *,
                 protocol: KernelProtocol, kernel: KernelChannel | None = None,
                 notifier: Notifier | None = None, kernel_timeout: float = 15.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.child = child
        self.gate = gate
        self.protocol = protocol
        self.kernel = kernel
        self.notifier = notifier
        self.kernel_timeout = kernel_timeout
        self.clock = clock
        self.pending_child: wire.Op | None = None
        self.reconnect_at: float | None = None if kernel else clock()
        self.backoff = BACKOFF_START
        self.waiting_logged = False
        self.exit_code: int | None = None
        self.started = time.time()
        self.on_change: Callable[[], None] | None = None  # status publication hook
        self._change_due = False  # something changed that on_change has not seen
        self._change_since = 0.0  # when it first changed since on_change last saw it
        self._changed_at = 0.0  # when it last changed
        self.before_freeze: Callable[[], None] | None = None  # the last moment nothing is frozen
        self.refresh_every: float | None = None  # on_change at least this often
        self._refresh_at: float | None = None
        self.left_frozen = False  # on the way out: might something we froze still be frozen?
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signals: list[int] = []
        self._poller = select.poll()
        self._kernel_fd: int | None = None

    # --- the loop -----------------------------------------------------------------------

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, lambda signum, _f: self._signals.append(signum))

    def run(self) -> int:
        self._poller = select.poll()
        self._poller.register(self.child.fileno(), select.POLLIN)
        self._poller.register(self._wake_r, select.POLLIN)
        if self.notifier is not None:
            self._poller.register(self.notifier.fileno(), select.POLLIN)
        self._changed()  # the first status and metrics
        while self.exit_code is None:
            self._watch_kernel()
            try:
                self._publish()
            except FrontendGone as e:
                self._frontend_died(str(e))
                continue
            ready = dict(self._poller.poll(self._timeout_ms()))
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 256)
            if self._signals:
                self._stop(f"signal {self._signals[0]}")
                break
            try:
                self._dispatch(ready)
            except ChildGone as e:
                self._child_died(str(e))
            except FrontendGone as e:
                self._frontend_died(str(e))
            except E.EngineError as e:  # a bug here: _on_child and _can_read_kernel forbid it
                self._end_with_the_child(f"the engine lost track of the conversation ({e})",
                                         EXIT_ENGINE_LOST_TRACK, trust_engine=False)
        return self.exit_code if self.exit_code is not None else EXIT_OK

    def _watch_kernel(self) -> None:
        """Poll the kernel descriptor only when we may read a new request."""
        want = self.kernel.fileno() if self.kernel and self._can_read_kernel() else None
        if want == self._kernel_fd:
            return
        if self._kernel_fd is not None:
            with contextlib.suppress(KeyError):
                self._poller.unregister(self._kernel_fd)
        if want is not None and self.kernel is not None:
            self._poller.register(want, self.kernel.poll_mask)
        self._kernel_fd = want

    def _dispatch(self, ready: dict[int, int]) -> None:
        if self.child.fileno() in ready:
            self._on_child()
        if self.notifier is not None and self.notifier.fileno() in ready:
            reports = self.notifier.receive()
            for done in reports:
                self._run(self.engine.on_notify_done(done.event, done.txid,
                                                     done.results, self.clock()))
            if reports:
                self._changed()  # a THAW report changes the history, not the state
        if self._kernel_fd is not None and self._kernel_fd in ready and self._can_read_kernel():
            self._on_kernel()
        self._run(self.engine.on_timer(self.clock()))
        if self._refresh_at is not None and self.clock() >= self._refresh_at:
            self._changed()
        if (self.reconnect_at is not None and self.clock() >= self.reconnect_at
                and self.pending_child is None):
            self._reopen()

    def _can_read_kernel(self) -> bool:
        return not self.engine.busy and self.pending_child is None

    def _timeout_ms(self) -> int | None:
        deadlines = [d for d in (self.engine.deadline(), self.reconnect_at, self._refresh_at,
                                 self._publish_at()) if d is not None]
        if not deadlines:
            return None
        return max(0, int((min(deadlines) - self.clock()) * 1000) + 1)

    # --- the kernel ----------------------------------------------------------------------

    def _on_kernel(self) -> None:
        assert self.kernel is not None
        try:
            req = self.kernel.read_request()
        except (KernelLost, KernelProtocolError) as e:
            log.warning("kernel channel: %s", e)
            self._run(self.engine.on_kernel_lost(self.clock()))
            return
        if req is None:
            log.debug("woken with nothing pending (the request timed out before we read it)")
            return
        log.debug("kernel request %s (%d)", req.op.value if req.op else "unknown", req.code)
        now = self.clock()
        self._run(self.engine.on_kernel(req, now, self.protocol.deadline(req, now,
                                                                         self.kernel_timeout)))

    def _reply(self, act: E.ReplyKernel) -> None:
        if self.kernel is None:
            return
        try:
            started = self.clock()
            self.kernel.reply(act.request, act.ok)
            self.engine.ledger.timing(act.txid, "reply", self.clock() - started)
        except KernelLost as e:
            log.warning("kernel channel: %s (late reply?)", e)
            self._run(self.engine.on_kernel_lost(self.clock()))

    def _reopen(self) -> None:
        self.reconnect_at = None
        if self.kernel is not None:
            self.kernel.close()
            self.kernel = None
        self.pending_child = wire.Op.REOPEN
        self.child.send(wire.Op.REOPEN)

    def _reopened(self, res: wire.Result, fds: list[int]) -> None:
        if res.status is not wire.Status.OK or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            if not self.waiting_logged:
                log.warning("cannot reopen the kernel device (%s): retrying",
                            os.strerror(res.errno) if res.errno else "no descriptor")
                self.waiting_logged = True
            self._retry_later()
            return
        try:
            limit_device(fds[0])
            kernel = KernelChannel(attach(fds[0], self.protocol.name), self.protocol)
            kernel.register()
        except (OSError, KernelLost, KernelProtocolError) as e:
            with contextlib.suppress(OSError):
                os.close(fds[0])
            log.warning("reopening the kernel device failed: %s", e)
            self._retry_later()
            return
        self.kernel = kernel
        self.backoff = BACKOFF_START
        self.waiting_logged = False
        log.info("kernel device reopened and registered")
        self._changed()

    def _retry_later(self) -> None:
        self.reconnect_at = self.clock() + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    # --- the child -------------------------------------------------------------------------

    def _on_child(self) -> None:
        msg, fds = self.child.receive()
        if isinstance(msg, wire.Log):
            return
        if isinstance(msg, wire.Event):
            self._run(self.engine.on_auto_thaw(msg, self.clock()))
            return
        if isinstance(msg, wire.Hello):
            raise ChildGone("the child said HELLO twice")
        if self.pending_child is None or msg.op is not self.pending_child:
            raise ChildGone(f"unexpected answer to {msg.op.name} from the child")
        self.pending_child = None
        if msg.op is wire.Op.REOPEN:
            self._reopened(msg, fds)
            return
        self._run(self.engine.on_child_result(msg, self.clock()))

    def _child_died(self, why: str) -> None:
        # A Linux freeze outlives its holder: the next child's recovery thaws it.
        self.left_frozen = self.engine.frozen or self.pending_child is not None
        self._fail_pending()
        self.gate.resume()
        status = self.child.exit_status(2.0)
        log.error("the root child is gone (%s; exit status %s): exiting so that the service "
                  "manager restarts us", why, status)
        self.exit_code = EXIT_CHILD_DIED

    def _frontend_died(self, why: str) -> None:
        self._end_with_the_child(f"the frontend is gone ({why})", EXIT_FRONTEND_DIED)

    def _end_with_the_child(self, why: str, exit_code: int, trust_engine: bool = True) -> None:
        """Fail what the kernel waits for, let the child thaw and exit, and exit too.
        Without `trust_engine`, anything may be frozen, whatever the engine believes."""
        self._fail_pending()
        frozen = self.engine.frozen or not trust_engine
        # Closing the link is the child's cue to thaw (if frozen) and exit.
        self.child.close()
        status = self.child.exit_status(10.0)
        self._left_frozen_after(status, frozen or self.pending_child is not None)
        self.gate.resume()
        log.error("%s: %sexiting so that the service manager restarts us", why,
                  "the child thawed; " if frozen and status == 0 else "")
        self.exit_code = exit_code

    def _left_frozen_after(self, child_status: int | None, risky: bool) -> None:
        """The child exits 0 only once it has thawed what it held; anything else
        (killed, stuck, failed) may have left a Linux freeze behind."""
        self.left_frozen = risky and child_status != 0

    def _fail_pending(self) -> None:
        tx = self.engine.tx
        if tx is not None and tx.request is not None and not tx.replied and self.kernel:
            with contextlib.suppress(KernelLost):
                self.kernel.reply(tx.request, False)

    # --- actions ----------------------------------------------------------------------------

    def _run(self, actions: list[E.Action]) -> None:
        for act in actions:
            if isinstance(act, E.AskChild):
                if act.op is wire.Op.FREEZE and self.before_freeze is not None:
                    self.before_freeze()
                self.pending_child = act.op
                self.child.send(act.op)
            elif isinstance(act, E.ReplyKernel):
                self._reply(act)
            elif isinstance(act, E.Notify):
                if self.notifier is not None and not self.notifier.notify(
                        act.event, act.txid, act.deadline):
                    # No subscriber would hear it: done at once, as the frontend would say.
                    self._run(self.engine.on_notify_done(act.event, act.txid, (), self.clock()))
            elif isinstance(act, E.HoldLogs):
                self.gate.hold()
            elif isinstance(act, E.ReleaseLogs):
                self.gate.resume()
            elif isinstance(act, E.Reopen):
                if self.kernel is not None:
                    self.kernel.close()
                    self.kernel = None
                self.reconnect_at = self.clock()
        if actions:
            self._changed()

    def _changed(self) -> None:
        now = self.clock()
        if self.refresh_every is not None:
            self._refresh_at = now + self.refresh_every
        if not self._change_due:
            self._change_since = now
        self._change_due, self._changed_at = True, now

    def _publish_at(self) -> float | None:
        """When on_change is to see what changed: not in the middle of a transaction
        younger than PUBLISH_AFTER (the status then shows it in flight: a CHECK takes well
        under a millisecond, and the parent stays idle while the child freezes), and
        otherwise once nothing has changed for PUBLISH_QUIET, so that a host's requests in
        quick succession (CHECK, then FREEZE) do not wait behind it, yet never later than
        PUBLISH_AFTER after the first change it has not seen."""
        if not self._change_due or self.on_change is None:
            return None
        tx = self.engine.tx
        if tx is not None:
            return tx.started + PUBLISH_AFTER
        return min(self._changed_at + PUBLISH_QUIET, self._change_since + PUBLISH_AFTER)

    def _publish(self) -> None:
        at = self._publish_at()
        if at is not None and self.clock() >= at and self.on_change is not None:
            self._change_due = False
            self.on_change()

    def _stop(self, why: str) -> None:
        log.info("stopping (%s)", why)
        self._fail_pending()
        risky = self.engine.frozen or self.pending_child is not None
        if risky:
            # Closing the link is the child's cue to thaw everything and exit.
            self.child.close()
        else:
            with contextlib.suppress(ChildGone):
                self.child.request(wire.Op.QUIT, timeout=5.0)
            self.child.close()
        self._left_frozen_after(self.child.exit_status(10.0), risky)
        self.gate.resume()
        self.exit_code = EXIT_OK
