"""The root child's part of the configuration file, read by the child itself.

The child reads the same root-owned file as the parent and looks only at the
sections that decide what root does: [freeze], [check], [watchdog] and
[state].  A bad value of one of its keys is refused with one line naming the
key.  The parent validates the whole file before it starts the child
(privileged/config.py, with tomllib and these same key readers), so an
operator sees such a mistake once, early, in the same words.

The file is TOML; the child reads it with its own reader
(privileged/toml_subset.py), the parent as root with tomllib.
"""

from __future__ import annotations

import os
import stat

from privileged.safe_path import Untrusted, open_trusted

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, TypeVar

    T = TypeVar("T")

CHILD_SECTIONS = ("freeze", "check", "watchdog", "state")
_MAX_FILE = 1 << 20


class ConfigError(Exception):
    """A one-line, user-facing description of what is wrong with the config."""


class FreezeConfig:
    def __init__(self, only: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                 presync: bool = True, rcu_expedited: bool = False) -> None:
        self.only, self.exclude, self.presync = only, exclude, presync
        self.rcu_expedited = rcu_expedited  # Linux: /sys/kernel/rcu_expedited = 1 while freezing


class CheckConfig:
    def __init__(self, mode: str = "default", zfs: str = "ignore") -> None:
        self.mode, self.zfs = mode, zfs  # "default" | "strict"; "ignore" | "veto"


class WatchdogConfig:
    """max_frozen_seconds bounds each freeze; the frozen-time budget (budget.py) is a bucket
    of budget_seconds that refills at budget_seconds_per_hour."""

    def __init__(self, max_frozen_seconds: float = 60.0, budget_seconds: float = 120.0,
                 budget_seconds_per_hour: float = 240.0) -> None:
        self.max_frozen_seconds, self.budget_seconds = max_frozen_seconds, budget_seconds
        self.budget_seconds_per_hour = budget_seconds_per_hour


class StateConfig:
    def __init__(self, dir: str = "/run/hv-vss-agent") -> None:
        self.dir = dir


class ChildConfig:  # noqa: PLW1641 (compared, never hashed)
    def __init__(self, freeze: FreezeConfig | None = None, check: CheckConfig | None = None,
                 watchdog: WatchdogConfig | None = None, state: StateConfig | None = None
                 ) -> None:
        self.freeze, self.check = freeze or FreezeConfig(), check or CheckConfig()
        self.watchdog, self.state = watchdog or WatchdogConfig(), state or StateConfig()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChildConfig) and _fields(self) == _fields(other)


def _fields(c: ChildConfig) -> list[dict[str, object]]:
    return [vars(c.freeze), vars(c.check), vars(c.watchdog), vars(c.state)]


class Table:
    """One TOML table, read key by key; a key not read is an error (done())."""

    def __init__(self, name: str, raw: object) -> None:
        if not isinstance(raw, dict | None):
            raise ConfigError(f"[{name}] must be a table")
        self.name, self.raw, self.seen = name, raw or {}, set[str]()

    def get(self, key: str, default: T, expected: str, ok: Callable[[Any], bool]) -> T:
        """The key's value (`default` if absent: TOML has no null), if `ok` takes it."""
        self.seen.add(key)
        v = self.raw.get(key)
        if v is not None and not ok(v):
            raise ConfigError(f"[{self.name}] {key}: expected {expected}, got {v!r}")
        return default if v is None else v

    def boolean(self, key: str, default: bool) -> bool:
        return self.get(key, default, "true or false", lambda v: isinstance(v, bool))

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        v = self.get(key, default, "a number", lambda v: isinstance(v, int | float)
                     and not isinstance(v, bool) and v == v)  # noqa: PLR0124 (not NaN)
        if not lo <= v <= hi:
            raise ConfigError(f"[{self.name}] {key}: {v} is outside {lo:g}..{hi:g}")
        return float(v)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        return self.get(key, default, f"one of {', '.join(choices)}", lambda v: v in choices)

    def path(self, key: str, default: str) -> str:
        return os.path.normpath(self.get(key, default, "an absolute path", lambda v: isinstance(
            v, str) and v.startswith("/") and "\0" not in v))

    def strings(self, key: str, absolute: bool = False) -> tuple[str, ...]:
        v: list[str] = self.get(key, [], "a list of non-empty strings", lambda v: isinstance(
            v, list) and all(isinstance(s, str) and s and "\0" not in s for s in v))
        for s in v if absolute else ():
            if not s.startswith("/"):
                raise ConfigError(f"[{self.name}] {key}: {s!r} is not an absolute path")
        return tuple(os.path.normpath(s) if absolute else s for s in v)

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.seen)
        if unknown:
            raise ConfigError(f"[{self.name}]: unknown key {unknown[0]!r}")


def parse_child_sections(doc: Mapping[str, object]) -> ChildConfig:
    f = Table("freeze", doc.get("freeze"))
    freeze = FreezeConfig(f.strings("only", absolute=True), f.strings("exclude"),
                          f.boolean("presync", True), f.boolean("rcu_expedited", False))
    c = Table("check", doc.get("check"))
    check = CheckConfig(c.choice("mode", "default", ("default", "strict")),
                        c.choice("zfs", "ignore", ("ignore", "veto")))
    w = Table("watchdog", doc.get("watchdog"))
    if "cooldown_seconds" in w.raw:
        raise ConfigError("[watchdog] cooldown_seconds: no longer a setting; the frozen-time "
                          "budget (budget_seconds, budget_seconds_per_hour) replaces it")
    most = w.number("max_frozen_seconds", 60.0, 0.1, 3600.0)
    watchdog = WatchdogConfig(most, w.number("budget_seconds", max(120.0, most), most, 86400.0),
                              w.number("budget_seconds_per_hour", 240.0, 0.0, 3600.0))
    s = Table("state", doc.get("state"))
    state = StateConfig(s.path("dir", "/run/hv-vss-agent"))
    for table in (f, c, w, s):
        table.done()
    return ChildConfig(freeze, check, watchdog, state)


def read_config(path: str) -> str:
    """The text of a config file that root will act on; refused if others could change it.

    Opened once, checked on that descriptor (and every directory above it), and
    read from it: nothing can be swapped in between."""
    if not path.startswith("/"):
        raise ConfigError(f"config file {path}: not an absolute path")
    if not os.path.lexists(path):
        raise ConfigError(f"config file {path} does not exist")
    try:
        fd = open_trusted(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block us
    except Untrusted as e:
        raise ConfigError(f"refusing config file {path}: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"config file {path} is not a regular file")
        data = b"".join(iter(lambda: os.read(fd, _MAX_FILE), b""))
        return data.decode("utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8") from None
    finally:
        os.close(fd)
