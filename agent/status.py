"""What the agent says about itself: the engine's snapshot, and how `status` prints it.

The engine builds the snapshot (no I/O) whenever something changes and
pushes it to the frontend, which answers the control socket from it; so a
status request never waits for, nor disturbs, the engine.  Times inside the
engine are monotonic; the snapshot turns them into wall-clock seconds.  A
snapshot may be old by the time it is asked for (nothing changes while
frozen): the frontend brings its clocks up to the moment it answers
(`brought_up_to`), so `time`, `frozen_seconds` and the watchdog's time left
are those of the answer.
"""

from __future__ import annotations

import datetime
import os
import re
import time
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.child_link import ChildLink

if TYPE_CHECKING:
    from agent.service import Service

VERSION = 1
SHOWN_TRANSACTIONS = 10


def snapshot(service: Service, frontend_pid: int | None = None,
             max_frozen: float | None = None) -> dict[str, object]:
    """`max_frozen`: [watchdog] max_frozen_seconds, as the parent read it from the config."""
    now_m, now_w = service.clock(), time.time()
    e = service.engine

    def wall(t: object) -> float | None:
        return round(now_w - (now_m - t), 3) if isinstance(t, float | int) else None

    frozen_for = now_m - e.frozen_since if e.frozen and e.frozen_since is not None else None

    transactions = []
    for tx in e.history:
        d = tx.as_dict()
        d["started"] = wall(tx.started)
        transactions.append(d)
    return {
        "version": VERSION,
        "time": round(now_w, 3),
        "monotonic": now_m,
        "agent": {"pid": os.getpid(), "started": round(service.started, 3),
                  "protocol": service.protocol, "frontend_pid": frontend_pid,
                  "version": __version__},
        "state": "frozen" if e.frozen else "thawed",
        "frozen_since": wall(e.frozen_since),
        "frozen_seconds": None if frozen_for is None else round(frozen_for, 3),
        # The child's watchdog started counting before the parent heard FREEZE succeed:
        # it thaws at the latest this long after frozen_since (earlier if it must).
        "watchdog": {"max_frozen_seconds": max_frozen,
                     "seconds_left": None if frozen_for is None or max_frozen is None
                     else round(max(0.0, max_frozen - frozen_for), 3)},
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


def brought_up_to(status: dict[str, object] | None, now_w: float,
                  now_m: float) -> dict[str, object] | None:
    """The snapshot as of now (the frontend, answering): its clocks moved on by how old it is.

    Ages by the monotonic clock, so a wall-clock step while frozen changes neither
    the frozen time nor the watchdog's time left."""
    if status is None:
        return None
    built = status.get("monotonic")
    if not isinstance(built, float | int) or isinstance(built, bool):
        return status
    age = max(0.0, now_m - built)
    out = {**status, "time": round(now_w, 3), "monotonic": now_m}
    frozen_for = status.get("frozen_seconds")
    if isinstance(frozen_for, float | int):
        out["frozen_seconds"] = round(frozen_for + age, 3)
    wd = status.get("watchdog")
    if isinstance(wd, dict) and isinstance(wd.get("seconds_left"), float | int):
        out["watchdog"] = {**wd, "seconds_left": round(max(0.0, wd["seconds_left"] - age), 3)}
    return out


def child_health(child: ChildLink) -> dict[str, object]:
    code = child.proc.poll()
    hello = child.hello
    return {"pid": child.pid,
            "health": "running" if code is None else f"exited with status {code}",
            "selected": hello.targets if hello else None,
            "recovered": hello.recovered if hello else None}


# --- the client's rendering -----------------------------------------------------------------
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
        mounts = ", ".join(_UNPRINTABLE.sub("?", str(m)) for m in st.d.get("frozen_mounts") or []
                           ) if isinstance(st.d.get("frozen_mounts"), list) else "?"
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
