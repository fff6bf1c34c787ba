"""`hv-vss-agent status [--json] [--watch]`: ask the running agent, over its control socket.

Run by an operator, outside the agent's chroot, so it can add what the agent
itself cannot see from inside: psutil's facts (memory, threads, descriptors)
about the processes the agent reports.  The agent's answer is used as data
only; every field is optional to this code.

Exit status: 0 answered, 1 could not ask or no valid answer, 3 not running
(as LSB init scripts and `systemctl status` say it), 141 when whoever reads
the output stops reading (`status | head`), as if killed by SIGPIPE.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import re
import signal
import socket
import sys
import time
from typing import Any, TextIO

from agent.protocols import control

SHOWN_TRANSACTIONS = 10

TIMEOUT = 5.0
EXIT_FAILED = 1
EXIT_NOT_RUNNING = 3
EXIT_PIPE = 128 + signal.SIGPIPE
CLEAR = "\x1b[H\x1b[2J"


class NotRunning(control.ControlError):
    """Nothing listens on the control socket."""


def exit_code(e: control.ControlError) -> int:
    return EXIT_NOT_RUNNING if isinstance(e, NotRunning) else EXIT_FAILED


def fetch(path: str, timeout: float = TIMEOUT) -> dict[str, object]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(control.REQUEST)
        chunks, size = [], 0
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > control.MAX_ANSWER:
                raise control.ControlError("the agent's answer is too long")
    except TimeoutError:
        raise control.ControlError(f"no answer on {path} within {timeout:.0f} s") from None
    except FileNotFoundError:
        raise NotRunning(f"not running: no control socket at {path} (an agent makes it only "
                         "with [control] socket set)") from None
    except ConnectionRefusedError:
        raise NotRunning(f"not running: nothing listens on {path}, a socket left by an "
                         "agent that has stopped") from None
    except OSError as e:
        hint = " (are you root or in [control] admin_group?)" \
            if e.errno in (errno.EACCES, errno.EPERM) else ""
        raise control.ControlError(f"cannot ask the agent at {path}: "
                                   f"{e.strerror or e}{hint}") from None
    finally:
        sock.close()
    if not chunks:
        raise control.ControlError(f"the agent at {path} closed the connection without "
                                   "answering (are you root or in [control] admin_group?)")
    return control.decode_answer(b"".join(chunks))


def process_facts(status: dict[str, object]) -> dict[str, dict[str, object]]:
    try:
        import psutil
    except ImportError:  # an interpreter without the agent's dependencies
        return {"all": {"error": "psutil is not installed: no process facts"}}
    agent = status.get("agent") if isinstance(status.get("agent"), dict) else {}
    child = status.get("child") if isinstance(status.get("child"), dict) else {}
    assert isinstance(agent, dict) and isinstance(child, dict)
    pids = {"engine": agent.get("pid"), "frontend": agent.get("frontend_pid"),
            "root child": child.get("pid")}
    facts: dict[str, dict[str, object]] = {}
    for role, pid in pids.items():
        if not isinstance(pid, int):
            continue
        try:
            p = psutil.Process(pid)
            with p.oneshot():
                facts[role] = {"pid": pid, "rss": p.memory_info().rss,
                               "threads": p.num_threads(), "fds": _fds(p),
                               "uids": list(p.uids())}
        except psutil.NoSuchProcess:
            facts[role] = {"pid": pid, "error": f"pid {pid} is not running"}
        except psutil.AccessDenied:
            facts[role] = {"pid": pid, "error": f"pid {pid}: not allowed to look"}
    return facts


def _fds(p: object) -> int | None:
    try:
        return int(p.num_fds())  # type: ignore[attr-defined]
    except Exception:  # psutil.AccessDenied: not ours to look at
        return None


def report(path: str, as_json: bool, indent: int | None = 2) -> str:
    status = fetch(path)
    processes = process_facts(status)
    if as_json:
        status["processes"] = processes
        return json.dumps(status, indent=indent, sort_keys=True, default=str)
    return render_text(status, processes)


def run(path: str, as_json: bool) -> int:
    return _emit(sys.stdout, report(path, as_json) + "\n")


def watch(path: str, as_json: bool, interval: float) -> int:
    """Ask every `interval` seconds until interrupted, whatever the answer; the agent
    stopping or starting is part of what is watched.  On a terminal each answer
    replaces the last; otherwise they follow each other (JSON: one object a line)."""
    out = sys.stdout
    tty = out.isatty()
    try:
        while True:
            stamp = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
            try:
                text = report(path, as_json, indent=None)
            except control.ControlError as e:
                text = json.dumps({"error": str(e), "time": round(time.time(), 3)}) \
                    if as_json else f"hv-vss-agent status: {e}"
            if not as_json:
                text = f"{stamp}, every {interval:g} s (Ctrl-C to stop)\n{text}\n"
            code = _emit(out, (CLEAR if tty and not as_json else "") + text + "\n")
            if code:
                return code
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


def _emit(out: TextIO, text: str) -> int:
    try:
        out.write(text)
        out.flush()
    except BrokenPipeError:
        # The reader went away (`status | head`): no traceback, and no second error
        # when the interpreter flushes stdout on the way out.
        with open(os.devnull, "w", encoding="utf-8") as null:
            os.dup2(null.fileno(), out.fileno())
        return EXIT_PIPE
    return 0


# --- the rendering ----------------------------------------------------------------------------
# The answer came through the frontend, which faces untrusted clients: every field is
# optional, of any type, and printed without control characters.

# Control characters, and the line separators and bidi overrides that could disguise a line.
_UNPRINTABLE = re.compile(r"[^\x20-\x7e\u00a0-\uffff]|[\u2028\u2029\u202a-\u202e\u2066-\u2069]")


class _View:
    def __init__(self, d: object) -> None:
        self.d: dict[str, Any] = d if isinstance(d, dict) else {}

    def __getitem__(self, key: str) -> _View:
        return _View(self.d.get(key))

    def text(self, key: str, default: str = "?") -> str:
        v = self.d.get(key)
        return default if v is None or v == "" else _UNPRINTABLE.sub("?", str(v))[:300]

    def num(self, key: str) -> float:
        v = self.d.get(key)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0

    def when(self, key: str) -> str:
        v = self.d.get(key)
        if not isinstance(v, int | float) or isinstance(v, bool):
            return "?"
        try:
            return datetime.datetime.fromtimestamp(v).isoformat(sep=" ", timespec="seconds")
        except (OverflowError, OSError, ValueError):
            return "?"

    def views(self, key: str) -> list[_View]:
        v = self.d.get(key)
        return [_View(x) for x in v] if isinstance(v, list) else []

    def pairs(self, key: str) -> list[tuple[str, str]]:
        return [(_UNPRINTABLE.sub("?", str(k))[:80], self[key].text(k))
                for k in self[key].d]


def render_text(status: dict[str, object], processes: dict[str, dict[str, object]]) -> str:
    st = _View(status)
    agent, child, frontend = st["agent"], st["child"], st["frontend"]
    lines = [f"hv-vss-agent {agent.text('version')}: engine pid {agent.text('pid')}, frontend "
             f"pid {agent.text('frontend_pid')}, up since {agent.when('started')}",
             f"root child: pid {child.text('pid')}, {child.text('health')}, "
             f"{child.text('selected')} filesystem(s) selected at start"]
    if st.text("state") == "frozen":
        listed = st.d.get("frozen_mounts")
        mounts = ", ".join(_UNPRINTABLE.sub("?", str(m)) for m in listed) \
            if isinstance(listed, list) else "?"
        more = st.num("frozen_count") - len(listed) if isinstance(listed, list) else 0
        if more > 0:
            mounts = f"{mounts} and {more:.0f} more" if mounts else f"{more:.0f} filesystem(s)"
        frozen_for = st.num("frozen_seconds") if "frozen_seconds" in st.d \
            else st.num("time") - st.num("frozen_since")
        lines.append(f"state: FROZEN for {frozen_for:.1f} s (since {st.when('frozen_since')}): "
                     f"{mounts or '?'}")
        wd = st["watchdog"]
        if wd.d.get("seconds_left") is not None:
            lines.append(f"watchdog: thaws them in {wd.num('seconds_left'):.1f} s at the latest "
                         f"([watchdog] max_frozen_seconds {wd.text('max_frozen_seconds')})")
    else:
        busy = st.text("busy", "")
        lines.append("state: thawed" + (f" (busy: {busy})" if busy else ""))
    notify = st["notify"]
    lines.append(f"kernel: {'connected' if st['kernel'].d.get('connected') else 'NOT connected'}"
                 "; notifications: " + (f"on (policy {notify.text('policy')}, budget "
                                        f"{notify.text('budget')} s)"
                                        if notify.d.get("enabled") else "off"))
    subs = frontend.views("subscribers")
    lines.append(f"subscribers: {len(subs)}")
    lines += [f"  {s.text('name', '(no HELLO yet)')} uid {s.text('uid')} pid {s.text('pid')}, "
              f"connected since {s.when('connected_since')}" for s in subs]
    txs = st.views("transactions")
    lines.append(f"last transactions ({min(len(txs), SHOWN_TRANSACTIONS)} of {len(txs)}):")
    for tx in txs[-SHOWN_TRANSACTIONS:]:
        secs = tx["seconds"]
        stages = ", ".join(f"{k} {secs.num(k):.3f}" for k in secs.d if k != "total")
        detail = tx.text("detail", "")
        lines.append(f"  #{tx.text('id')} {tx.when('started')} {tx.text('op')}: "
                     f"{tx.text('result')} in {secs.num('total'):.3f} s"
                     + (f" [{stages}]" if stages else "") + (f" - {detail}" if detail else ""))
        for s in tx.views("subscribers"):
            reason = s.text("reason", "")
            lines.append(f"      {s.text('event')} {s.text('name')}: {s.text('result')}"
                         + (f" ({reason})" if reason else "")
                         + f" after {s.num('seconds'):.3f} s")
    events = st.views("events")
    if events:
        lines.append("events:")
        lines += [f"  {ev.when('time')} {ev.text('kind')}: {ev.text('detail')}"
                  for ev in events[-SHOWN_TRANSACTIONS:]]
    counters = st.pairs("counters") + [(f"frontend_{k}", v)
                                       for k, v in frontend.pairs("counters")]
    lines.append("counters since start: "
                 + (", ".join(f"{k}={v}" for k, v in counters) or "none"))
    for role, facts in processes.items():
        p = _View(facts)
        if "error" in p.d:
            lines.append(f"{role} process: {p.text('error')}")
        else:
            lines.append(f"{role} process {p.text('pid')}: rss {p.num('rss') / 2**20:.1f} MiB, "
                         f"{p.text('threads')} thread(s), {p.text('fds')} descriptor(s)")
    return "\n".join(lines)
