"""`hv-vss-agent hook --exec PATH`: qemu-ga's fsfreeze hooks, run by a subscriber.

Runs as whoever starts it (never as the agent's root child), subscribes, and
calls hooks exactly as qemu-ga does, so existing scripts work unchanged:

  PATH freeze   before the filesystems are frozen
  PATH thaw     after they are thawed again (also after a FREEZE that failed,
                so that what a freeze hook paused is resumed)

PATH may be a directory, as qemu-ga's fsfreeze-hook dispatcher handles
fsfreeze-hook.d: every executable regular file in it, in name order (C
locale, as the shell's glob), the same order for freeze and thaw, skipping
backup and package-manager leftovers (*~, *.bak, *.orig, *.rpmnew, *.rpmorig,
*.rpmsave, *.sample, *.dpkg-old, -new, -tmp, -dist, -bak, -backup, -remove).

Unlike that dispatcher, which always exits 0, a hook that fails (non-zero
exit, killed, or still running at the agent's deadline) is reported to the
agent, whose [notify] policy decides whether the backup goes on.  The other
hooks still run.  A hook that others could modify is refused: it must be
owned by root or by the user running this command, and not be writable by
group or others.  stdin is /dev/null; the last 4 KiB of its output are kept
and logged.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import select
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass

from agent.notify_client import AgentGone, SubscribeError, Subscription
from agent.notify_wire import Event, Notice

log = logging.getLogger("hv-vss-agent.hook")

IGNORED = ("~", ".bak", ".orig", ".rpmnew", ".rpmorig", ".rpmsave", ".sample", ".dpkg-old",
           ".dpkg-new", ".dpkg-tmp", ".dpkg-dist", ".dpkg-bak", ".dpkg-backup", ".dpkg-remove")
OUTPUT_KEPT = 4096
GRACE = 0.5  # seconds kept back from the agent's deadline to answer in time
BACKOFF_MAX = 30.0


class HookError(Exception):
    """A hook path we refuse to run; one line for the operator."""


@dataclass(frozen=True)
class HookResult:
    path: str
    ok: bool
    detail: str  # for the log and the agent: exit status, timeout, last output line
    output: str


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
        return hooks
    if not stat.S_ISREG(st.st_mode) or not os.access(path, os.X_OK):
        raise HookError(f"{path} is not an executable file or a directory")
    _check_owner(path, st)
    return [path]


def _check_owner(path: str, st: os.stat_result) -> None:
    if st.st_uid not in (0, os.geteuid()):
        raise HookError(f"{path} is owned by uid {st.st_uid}: it must be root's or yours")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise HookError(f"{path} is writable by group or others "
                        f"(mode {stat.S_IMODE(st.st_mode):04o}): refusing to run it")


def run_hook(path: str, arg: str, timeout: float) -> HookResult:
    started = time.monotonic()
    try:
        proc = subprocess.Popen([path, arg], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd="/", start_new_session=True)
    except OSError as e:
        return HookResult(path, False, f"cannot run: {e.strerror}", "")
    assert proc.stdout is not None
    kept, timed_out = b"", False
    deadline = started + max(0.0, timeout)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            kept = (kept + chunk)[-OUTPUT_KEPT:]
    if timed_out:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the hook and anything it started
    proc.stdout.close()
    code = proc.wait()
    output = kept.decode("utf-8", "replace")
    last = output.strip().splitlines()[-1][:100] if output.strip() else ""
    took = time.monotonic() - started
    if timed_out:
        return HookResult(path, False, f"{os.path.basename(path)} {arg}: killed after "
                          f"{took:.1f} s, at its deadline", output)
    if code != 0:
        why = f"exit status {code}" if code > 0 else f"killed by signal {-code}"
        return HookResult(path, False, f"{os.path.basename(path)} {arg}: {why}"
                          + (f": {last}" if last else ""), output)
    return HookResult(path, True, f"{os.path.basename(path)} {arg}: ok in {took:.2f} s", output)


def run_all(path: str, arg: str, timeout: float) -> list[HookResult]:
    """Every hook, in order, within one shared deadline."""
    deadline = time.monotonic() + timeout
    results = []
    for hook in find_hooks(path):
        results.append(run_hook(hook, arg, deadline - time.monotonic()))
    return results


class HookRunner:
    def __init__(self, path: str, cap: float | None) -> None:
        self.path = path
        self.cap = cap  # --timeout: no hook run takes longer than this

    def __call__(self, sub: Subscription, notice: Notice) -> None:
        if notice.event is Event.CHECK:
            sub.ok(notice)  # qemu-ga's convention has no check: nothing to run
            return
        arg = notice.event.value.lower()
        budget = notice.ms / 1000
        timeout = budget - min(GRACE, budget / 10)
        if self.cap is not None:
            timeout = min(timeout, self.cap)
        try:
            results = run_all(self.path, arg, timeout)
        except HookError as e:
            log.error("%s", e)
            sub.fail(notice, str(e))
            return
        for r in results:
            (log.info if r.ok else log.warning)("%s", r.detail)
            if not r.ok and r.output.strip():
                log.warning("output of %s:\n%s", r.path, r.output.rstrip())
        failed = [r for r in results if not r.ok]
        if failed:
            sub.fail(notice, "; ".join(r.detail for r in failed))
        else:
            sub.ok(notice)


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
    runner = HookRunner(path, args.timeout)
    name = args.name or default_name(path)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    backoff, connected_once = 1.0, False
    while True:
        try:
            sub = Subscription(socket_path, name, timeout=args.timeout)
        except SubscribeError as e:
            if (not connected_once and not args.wait) or e.refused:
                sys.stderr.write(f"hv-vss-agent hook: {e}\n")
                return 1
            log.debug("%s: retrying in %.0f s", e, backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            continue
        connected_once, backoff = True, 1.0
        log.info("subscribed to %s as %s (subscriber %d): %d hook(s) in %s", socket_path, name,
                 sub.sub_id, len(hooks), path)
        try:
            with sub:
                while True:
                    notice = sub.next_event()
                    if notice is not None:
                        runner(sub, notice)
        except AgentGone as e:
            log.warning("%s: subscribing again when the agent is back", e)
