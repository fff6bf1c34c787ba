"""`hv-vss-agent hook --exec PATH`: qemu-ga's fsfreeze hooks, run by a subscriber.

Runs as whoever starts it (never as the agent's root child), subscribes, and
calls hooks as qemu-ga does, so existing hook scripts work unchanged:

  PATH freeze   before the filesystems are frozen
  PATH thaw     after they are thawed again (also after a FREEZE that failed,
                so that what a freeze hook paused is resumed)

PATH may be a directory, as qemu-ga's fsfreeze-hook dispatcher handles
fsfreeze-hook.d: every executable regular file in it, in name order (C
locale, as the shell's glob), the same order for freeze and thaw, skipping
backup and package-manager leftovers (*~, *.bak, *.orig, *.rpmnew, *.rpmorig,
*.rpmsave, *.sample, *.dpkg-old, -new, -tmp, -dist, -bak, -backup, -remove).
Give the directory, not the dispatcher: the dispatcher exits 0 whatever its
hooks do, and run by anyone but root it cannot open its log in /var/log and
then runs no hook at all.  We refuse it in that case (`dispatcher_problem`).

What each event waits for:

  CHECK   nothing: the convention has no check, so it is answered as soon as
          it arrives, even while thaw hooks still run.
  FREEZE  the agent freezes only after our answer.  The freeze hooks share the
          time it gives us, counted from when the FREEZE arrived (it may have
          waited behind thaw hooks still running).  A hook that exits non-zero,
          is still running then (it is killed), or is not started by then
          fails the FREEZE; the others still run.
  THAW    the agent answers the host's THAW as soon as the filesystems are
          thawed, without waiting for us: the snapshot is taken, a slow thaw
          hook must not become a failed backup, and the host can do nothing
          with its failure.  The thaw hooks run right after, for the hooks
          whose freeze ran, in the same order, each with the whole time for
          itself, so that one that hangs cannot keep the next from resuming
          its application.  The agent logs and records their results.

If the agent goes away between FREEZE and THAW, the thaw hooks run anyway
(its root child thaws when the agent ends).  A hook is done when it exits;
what it leaves running in the background (a lock holder) may keep its output
open, which is logged line by line whenever it comes.  Nothing a hook starts
outlives this command (agent/clients/hook_process.py).

A hook that others could modify is refused: it must be owned by root or by
the user running this command, and not be writable by group or others.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import stat
import sys
import time
from collections import deque
from dataclasses import dataclass

from agent.clients.hook_process import Supervisor
from agent.clients.notify import AgentGone, SubscribeError, Subscription
from agent.protocols.notify import Notice
from agent.protocols.verb import Verb

log = logging.getLogger("hv-vss-agent.hook")

IGNORED = ("~", ".bak", ".orig", ".rpmnew", ".rpmorig", ".rpmsave", ".sample", ".dpkg-old",
           ".dpkg-new", ".dpkg-tmp", ".dpkg-dist", ".dpkg-bak", ".dpkg-backup", ".dpkg-remove")
GRACE = 0.5  # seconds kept back from the agent's deadline to answer in time
BACKOFF_MAX = 30.0
ORPHAN_THAW = 10.0  # seconds for each thaw hook when the agent is gone ([notify] timeout)
DISPATCHER_READ = 65536
# qemu's dispatcher appends everything to LOGFILE=/var/log/...; without a way to
# fall back (newer versions use logger(1)), a log it cannot open means no hook runs.
_LOGFILE = re.compile(rb"""^[ \t]*LOGFILE=["']?([^"'\s;]+)""", re.M)


class HookError(Exception):
    """A hook path we refuse to run; one line for the operator."""


class Stopped(Exception):
    """SIGTERM, SIGINT or SIGHUP: every hook process is killed and we exit."""


@dataclass(frozen=True)
class HookResult:
    path: str
    ok: bool
    detail: str  # for the log and the agent: exit status, timeout, last output line


# --- which hooks ------------------------------------------------------------------------


def find_hooks(path: str) -> list[str]:
    """The executables to run, in order; checked as qemu-ga's dispatcher would not."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise HookError(f"{path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        _check_owner(path, st)
        hooks = []
        for name in sorted(os.listdir(path), key=os.fsencode):
            full = os.path.join(path, name)
            if name.endswith(IGNORED) or not os.path.isfile(full) or not os.access(full,
                                                                                   os.X_OK):
                continue
            _check_owner(full, os.stat(full))
            hooks.append(full)
    elif stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK):
        _check_owner(path, st)
        hooks = [path]
    else:
        raise HookError(f"{path} is not an executable file or a directory")
    for hook in hooks:
        problem = dispatcher_problem(hook)
        if problem:
            raise HookError(problem)
    return hooks


def _check_owner(path: str, st: os.stat_result) -> None:
    if st.st_uid not in (0, os.geteuid()):
        raise HookError(f"{path} is owned by uid {st.st_uid}: it must be root's or yours")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise HookError(f"{path} is writable by group or others "
                        f"(mode {stat.S_IMODE(st.st_mode):04o}): refusing to run it")


@dataclass(frozen=True)
class Dispatcher:
    """qemu-ga's fsfreeze-hook, or a script written like it."""

    hooks: str  # the fsfreeze-hook.d it runs
    log: str | None  # the log it cannot run a hook without, if it names one


def as_dispatcher(path: str) -> Dispatcher | None:
    """Recognised by its text: a script that runs what is in fsfreeze-hook.d."""
    try:
        with open(path, "rb") as f:
            text = f.read(DISPATCHER_READ)
    except OSError:
        return None
    if not text.startswith(b"#!") or b"fsfreeze-hook.d" not in text:
        return None
    m = _LOGFILE.search(text)
    logfile = None
    if m and b"$" not in m.group(1) and b"logger" not in text:
        logfile = os.fsdecode(m.group(1))
    return Dispatcher(os.path.join(os.path.dirname(os.path.realpath(path)), "fsfreeze-hook.d"),
                      logfile)


def dispatcher_problem(path: str) -> str | None:
    """Why this dispatcher would run none of its hooks for us, if it would not."""
    d = as_dispatcher(path)
    if d is None or d.log is None or _can_append(d.log):
        return None
    return (f"{path} is qemu-ga's fsfreeze-hook dispatcher: as uid {os.geteuid()} it cannot "
            f"write its log {d.log}, so it would run none of its hooks and still exit 0; "
            f"run them directly with --exec {d.hooks}")


def _can_append(path: str) -> bool:
    if os.path.lexists(path):
        return os.access(path, os.W_OK)
    return os.access(os.path.dirname(path) or ".", os.W_OK | os.X_OK)


# --- running them -------------------------------------------------------------------------


class HookClient:
    """Events in, hooks run, answers out: one event at a time, in the order they came."""

    def __init__(self, path: str, cap: float | None, sup: Supervisor) -> None:
        self.path = path
        self.cap = cap  # --timeout: no event's hooks take longer than this
        self.sup = sup
        self.sub: Subscription | None = None
        self.gone: str | None = None  # why the agent went away
        self.pending: deque[tuple[Notice, float]] = deque()  # with when each arrived
        self.frozen: list[str] = []  # hooks whose freeze ran: they are owed a thaw

    def serve(self, sub: Subscription) -> str:
        """Answer events until the agent goes away; returns why.  Raises Stopped."""
        self.sub, self.gone = sub, None
        while self.gone is None:
            if self.pending:
                self._handle(*self.pending.popleft())
            else:
                self._wait(None)
        self.pending.clear()  # a dead agent's FREEZE is not acted on
        if self.frozen:
            log.warning("%s after FREEZE: running the thaw hooks, so that nothing stays "
                        "paused", self.gone)
            self._thaw(self.cap or ORPHAN_THAW)
        return self.gone

    def _wait(self, until: float | None) -> None:
        """Until `until`, a signal, or a line from the agent; hook output is logged."""
        if self.sup.stopping:
            raise Stopped
        sub = self.sub if self.gone is None else None
        if sub is not None and sub.buffered:
            until = time.monotonic()  # look at what is buffered without waiting
        ready = self.sup.wait(until, [sub] if sub is not None else [])
        if sub is not None and (ready or sub.buffered):
            try:
                events = sub.read_events()
            except AgentGone as e:
                self.gone = str(e)
            else:
                now = time.monotonic()
                for notice in events:
                    if notice.event is Verb.CHECK:
                        self._answer(notice, [])  # nothing to run: not behind thaw hooks
                    else:
                        self.pending.append((notice, now))
        if self.sup.stopping:
            raise Stopped

    def _handle(self, notice: Notice, arrived: float) -> None:
        if notice.event is Verb.FREEZE:
            self._answer(notice, self._freeze(arrived + self._time(notice)))
        else:
            self._answer(notice, self._thaw(self._time(notice)))

    def _time(self, notice: Notice) -> float:
        budget = notice.ms / 1000
        seconds = budget - min(GRACE, budget / 10)
        return seconds if self.cap is None else min(seconds, self.cap)

    def _freeze(self, deadline: float) -> list[HookResult]:
        try:
            hooks = find_hooks(self.path)
        except HookError as e:
            log.error("%s", e)
            return [HookResult(self.path, False, str(e))]
        results = []
        for hook in hooks:
            if self.gone is not None:
                break  # no one to answer; serve() thaws what did run
            if time.monotonic() >= deadline:
                results.append(self._report(HookResult(
                    hook, False, f"{os.path.basename(hook)} freeze: not run, no time left "
                    "before the agent's deadline")))
                continue
            self.frozen.append(hook)
            results.append(self._run(hook, "freeze", deadline))
        return results

    def _thaw(self, each: float) -> list[HookResult]:
        hooks, self.frozen = self.frozen, []
        return [self._run(hook, "thaw", time.monotonic() + each) for hook in hooks]

    def _run(self, hook: str, arg: str, deadline: float) -> HookResult:
        """One hook, until it exits or its deadline; what it leaves behind keeps running."""
        name = f"{os.path.basename(hook)} {arg}"
        started = time.monotonic()
        try:
            group = self.sup.start(hook, arg)
        except OSError as e:
            return self._report(HookResult(hook, False, f"{name}: cannot run: {e.strerror}"))
        while not group.exited():
            if time.monotonic() >= deadline:
                self.sup.kill(group)  # the hook and everything it started
                self.sup.drain(group)
                return self._report(HookResult(hook, False, f"{name}: killed after "
                                    f"{time.monotonic() - started:.1f} s, at its deadline"))
            self._wait(deadline)
        took = time.monotonic() - started
        self.sup.drain(group)
        self.sup.tidy()
        code = group.status
        assert code is not None
        if code != 0:
            why = f"exit status {code}" if code > 0 else f"killed by signal {-code}"
            last = group.output.last_line()
            return self._report(HookResult(hook, False, f"{name}: {why}"
                                           + (f": {last}" if last else "")))
        left = "; what it started keeps running" if group in self.sup.groups else ""
        return self._report(HookResult(hook, True, f"{name}: ok in {took:.2f} s{left}"))

    @staticmethod
    def _report(r: HookResult) -> HookResult:
        (log.info if r.ok else log.warning)("%s", r.detail)
        return r

    def _answer(self, notice: Notice, results: list[HookResult]) -> None:
        if self.sub is None or self.gone is not None:
            return
        failed = [r for r in results if not r.ok]
        try:
            if failed:
                self.sub.fail(notice, "; ".join(r.detail for r in failed))
            else:
                self.sub.ok(notice)
        except AgentGone as e:
            self.gone = str(e)


def default_name(path: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._@+-]", "-", os.path.basename(path.rstrip("/")) or "hook")
    return f"hook-{base}"[:64]


def run(args: argparse.Namespace, socket_path: str) -> int:
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="hv-vss-agent hook[%(process)d]: %(levelname)s: %(message)s")
    path = os.path.abspath(args.exec)
    try:
        hooks = find_hooks(path)
    except HookError as e:
        sys.stderr.write(f"hv-vss-agent hook: {e}\n")
        return 1
    for hook in hooks:
        d = as_dispatcher(hook)
        if d is not None:
            log.warning("%s is qemu-ga's fsfreeze-hook dispatcher: it exits 0 whatever its "
                        "hooks do, so their failures never reach the agent; --exec %s runs "
                        "the same hooks and reports each one", hook, d.hooks)
    sup = Supervisor()
    try:
        return _subscribe(args, socket_path, path, len(hooks), HookClient(path, args.timeout,
                                                                           sup))
    except Stopped:
        return 0
    finally:
        sup.close()


def _subscribe(args: argparse.Namespace, socket_path: str, path: str, count: int,
               client: HookClient) -> int:
    name = args.name or default_name(path)
    backoff, connected_once = 1.0, False
    while True:
        if client.sup.stopping:
            raise Stopped
        try:
            sub = Subscription(socket_path, name, timeout=args.timeout)
        except SubscribeError as e:
            if (not connected_once and not args.wait) or e.refused:
                sys.stderr.write(f"hv-vss-agent hook: {e}\n")
                return 1
            log.debug("%s: retrying in %.0f s", e, backoff)
            until = time.monotonic() + backoff
            while time.monotonic() < until and not client.sup.stopping:
                client.sup.wait(until)
            backoff = min(backoff * 2, BACKOFF_MAX)
            continue
        connected_once, backoff = True, 1.0
        log.info("subscribed to %s as %s (subscriber %d): %d hook(s) in %s", socket_path, name,
                 sub.sub_id, count, path)
        with sub:
            why = client.serve(sub)
        log.warning("%s: subscribing again when the agent is back", why)
