"""What the agent says about itself: the engine's snapshot, and how `status` prints it.

The engine builds the snapshot (no I/O) whenever something changes and
pushes it to the frontend, which answers the control socket from it; so a
status request never waits for, nor disturbs, the engine.  Times inside the
engine are monotonic; the snapshot turns them into wall-clock seconds.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import TYPE_CHECKING

from agent.child_link import ChildLink

if TYPE_CHECKING:
    from agent.service import Service

VERSION = 1
SHOWN_TRANSACTIONS = 10


def snapshot(service: Service, frontend_pid: int | None = None) -> dict[str, object]:
    now_m, now_w = service.clock(), time.time()
    e = service.engine

    def wall(t: object) -> float | None:
        return round(now_w - (now_m - t), 3) if isinstance(t, float | int) else None

    transactions = []
    for tx in e.history:
        d = tx.as_dict()
        d["started"] = wall(tx.started)
        transactions.append(d)
    return {
        "version": VERSION,
        "time": round(now_w, 3),
        "agent": {"pid": os.getpid(), "started": round(service.started, 3),
                  "protocol": service.protocol, "frontend_pid": frontend_pid},
        "state": "frozen" if e.frozen else "thawed",
        "frozen_since": wall(e.frozen_since),
        "frozen_mounts": [m.strip() for m in e.frozen_mounts.split(",") if m.strip()],
        "busy": e.tx.kind.value if e.tx else None,
        "consistency_lost": e.consistency_lost,
        "child": child_health(service.child),
        "kernel": {"connected": service.kernel is not None},
        "notify": {"enabled": e.notify.enabled, "policy": e.notify.policy,
                   "budget": e.notify.budget},
        "transactions": transactions,
        "events": [{**ev, "time": wall(ev["time"])} for ev in e.events],
        "counters": dict(sorted(e.counters.items())),
        "histograms": {k: h.as_dict() for k, h in e.histograms.items()},
    }


def child_health(child: ChildLink) -> dict[str, object]:
    code = child.proc.poll()
    hello = child.hello
    return {"pid": child.pid,
            "health": "running" if code is None else f"exited with status {code}",
            "selected": hello.targets if hello else None,
            "recovered": hello.recovered if hello else None}


# --- the client's rendering -----------------------------------------------------------------

def _when(t: object) -> str:
    if not isinstance(t, float | int):
        return "?"
    return datetime.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")


def _get(d: object, *keys: str) -> object:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def render_text(st: dict[str, object], processes: dict[str, dict[str, object]]) -> str:
    lines = []
    agent, child = _get(st, "agent"), _get(st, "child")
    lines.append(f"hv-vss-agent: engine pid {_get(agent, 'pid')}, frontend pid "
                 f"{_get(agent, 'frontend_pid')}, up since {_when(_get(agent, 'started'))}")
    lines.append(f"root child: pid {_get(child, 'pid')}, {_get(child, 'health')}, "
                 f"{_get(child, 'selected')} filesystem(s) selected at start")
    if st.get("state") == "frozen":
        since = _get(st, "frozen_since")
        for_s = (float(st["time"]) - since  # type: ignore[arg-type]
                 if isinstance(since, float | int) and isinstance(st.get("time"), float | int)
                 else 0.0)
        mounts = ", ".join(str(m) for m in st.get("frozen_mounts") or []) or "?"  # type: ignore[attr-defined]
        lines.append(f"state: FROZEN since {_when(since)} ({for_s:.1f} s): {mounts}")
    else:
        lines.append("state: thawed" + (f" (busy: {st['busy']})" if st.get("busy") else ""))
    lines.append(f"kernel: {'connected' if _get(st, 'kernel', 'connected') else 'NOT connected'}"
                 f"; notifications: "
                 + (f"on (policy {_get(st, 'notify', 'policy')}, budget "
                    f"{_get(st, 'notify', 'budget')} s)" if _get(st, 'notify', 'enabled')
                    else "off"))
    subs = _get(st, "frontend", "subscribers") or []
    assert isinstance(subs, list)
    lines.append(f"subscribers: {len(subs)}" + "".join(
        f"\n  {s.get('name') or '(no HELLO yet)'} uid {s.get('uid')} pid {s.get('pid')}, "
        f"connected since {_when(s.get('connected_since'))}" for s in subs))
    txs = st.get("transactions") or []
    assert isinstance(txs, list)
    lines.append(f"last transactions ({min(len(txs), SHOWN_TRANSACTIONS)} of {len(txs)}):")
    for tx in txs[-SHOWN_TRANSACTIONS:]:
        secs = tx.get("seconds") or {}
        stages = ", ".join(f"{k} {v:.3f}" for k, v in secs.items() if k != "total")
        lines.append(f"  #{tx.get('id')} {_when(tx.get('started'))} {tx.get('op')}: "
                     f"{tx.get('result')} in {secs.get('total', 0):.3f} s"
                     + (f" [{stages}]" if stages else "")
                     + (f" - {tx.get('detail')}" if tx.get("detail") else ""))
        for s in tx.get("subscribers") or []:
            lines.append(f"      {s.get('event')} {s.get('name')}: {s.get('result')}"
                         + (f" ({s.get('reason')})" if s.get("reason") else "")
                         + f" after {s.get('seconds', 0):.3f} s")
    events = st.get("events") or []
    assert isinstance(events, list)
    if events:
        lines.append("events:")
        lines += [f"  {_when(ev.get('time'))} {ev.get('kind')}: {ev.get('detail')}"
                  for ev in events[-SHOWN_TRANSACTIONS:]]
    counters = {**(st.get("counters") or {}),  # type: ignore[dict-item]
                **{f"frontend_{k}": v
                   for k, v in (_get(st, "frontend", "counters") or {}).items()}}  # type: ignore[attr-defined]
    lines.append("counters since start: " + (", ".join(f"{k}={v}" for k, v in counters.items())
                                             or "none"))
    for role, facts in processes.items():
        if "error" in facts:
            lines.append(f"{role} process: {facts['error']}")
        else:
            rss = facts.get("rss", 0)
            lines.append(f"{role} process {facts.get('pid')}: rss "
                         f"{int(rss) / 2**20:.1f} MiB, {facts.get('threads')} thread(s), "  # type: ignore[call-overload]
                         f"{facts.get('fds', '?')} descriptor(s)")
    return "\n".join(lines)
