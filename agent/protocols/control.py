"""The control socket's protocol, both ends; no I/O.

One request per connection: the client sends `STATUS 1\\n`, the frontend
answers one line of JSON and closes.  Only root and members of [control]
admin_group may ask (the socket file is 0660 root:admin_group, and the peer's
credentials are checked again on every connection).
"""

from __future__ import annotations

import json

from agent.peercred import PeerCred

VERSION = 1
MAX_ANSWER = 1 << 20
REQUEST = f"STATUS {VERSION}\n".encode()


class ControlError(Exception):
    pass


def authorized(cred: PeerCred, admin_gid: int | None) -> bool:
    return cred.uid == 0 or (admin_gid is not None and admin_gid in cred.groups)


def check_request(data: bytes) -> None:
    if data != REQUEST:
        raise ControlError(f"unknown request {data[:20]!r}")


def encode_answer(engine: dict[str, object] | None, frontend: dict[str, object]) -> bytes:
    status = dict(engine) if engine else {"version": VERSION, "state": "starting"}
    status["frontend"] = frontend
    return json.dumps(status, separators=(",", ":"), default=str).encode() + b"\n"


def decode_answer(data: bytes) -> dict[str, object]:
    try:
        status = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ControlError(f"the agent's answer is not JSON: {e}") from None
    if not isinstance(status, dict):
        raise ControlError("the agent's answer is not a JSON object")
    return status


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
