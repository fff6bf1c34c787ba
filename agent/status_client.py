"""`hv-vss-agent status [--json]`: ask the running agent, over its control socket.

Run by an operator, outside the agent's chroot, so it can add what the agent
itself cannot see from inside: psutil's facts (memory, threads, descriptors)
about the processes the agent reports.  The agent's answer is used as data
only; every field is optional to this code.
"""

from __future__ import annotations

import json
import socket

from agent import control
from agent.status import render_text

TIMEOUT = 5.0


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
    except OSError as e:
        raise control.ControlError(f"cannot ask the agent at {path}: "
                                   f"{e.strerror or e}") from None
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


def run(path: str, as_json: bool) -> int:
    status = fetch(path)
    processes = process_facts(status)
    if as_json:
        status["processes"] = processes
        print(json.dumps(status, indent=2, sort_keys=True, default=str))
    else:
        print(render_text(status, processes))
    return 0
