"""The root child's part of the configuration file.

The child reads the same root-owned TOML file as the parent, by itself, and
looks only at the sections that decide what root does: [freeze], [check],
[watchdog] and [state].  The parent validates the whole file with these same
functions before it starts the child, so a bad value is reported once, early,
with the same words.
"""

from __future__ import annotations

import math
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from privileged.trust import Untrusted, open_trusted

CHILD_SECTIONS = ("freeze", "check", "watchdog", "state")
# An explicit buffer size: open() then skips its isatty() probe, an ioctl (TCGETS).
_BUFFERING = 1 << 16


class ConfigError(Exception):
    """A one-line, user-facing description of what is wrong with the config."""


@dataclass(frozen=True, slots=True)
class FreezeConfig:
    only: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    presync: bool = True
    rcu_expedited: bool = False  # Linux: /sys/kernel/rcu_expedited = 1 while freezing


@dataclass(frozen=True, slots=True)
class CheckConfig:
    mode: str = "default"  # "default" | "strict"
    zfs: str = "ignore"  # "ignore" | "veto"


@dataclass(frozen=True, slots=True)
class WatchdogConfig:
    max_frozen_seconds: float = 60.0
    # The frozen-time budget (privileged/budget.py): a bucket of frozen seconds that
    # each freeze draws on and that refills at budget_seconds_per_hour.
    budget_seconds: float = 120.0
    budget_seconds_per_hour: float = 240.0


@dataclass(frozen=True, slots=True)
class StateConfig:
    dir: str = "/run/hv-vss-agent"


@dataclass(frozen=True, slots=True)
class ChildConfig:
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    state: StateConfig = field(default_factory=StateConfig)


# --- small typed readers, shared with agent/config.py ------------------------

class Section:
    """One TOML table, read key by key; unknown keys are errors."""

    def __init__(self, name: str, raw: object) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"[{name}] must be a table")
        self.name = name
        self._raw: Mapping[str, Any] = raw
        self._seen: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._raw

    def _get(self, key: str) -> Any:
        self._seen.add(key)
        return self._raw.get(key)

    def _where(self, key: str) -> str:
        return f"[{self.name}] {key}"

    def boolean(self, key: str, default: bool) -> bool:
        v = self._get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise ConfigError(f"{self._where(key)}: expected true or false, got {v!r}")
        return v

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        v = self._get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ConfigError(f"{self._where(key)}: expected a number, got {v!r}")
        if not lo <= v <= hi:
            raise ConfigError(f"{self._where(key)}: {v} is outside {lo:g}..{hi:g}")
        return float(v)

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        v = self._get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{self._where(key)}: expected an integer, got {v!r}")
        if not lo <= v <= hi:
            raise ConfigError(f"{self._where(key)}: {v} is outside {lo}..{hi}")
        return v

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        v = self._get(key)
        if v is None:
            return default
        if v not in choices:
            raise ConfigError(
                f"{self._where(key)}: expected one of {', '.join(choices)}, got {v!r}")
        return str(v)

    def string(self, key: str, default: str) -> str:
        v = self._get(key)
        if v is None:
            return default
        if not isinstance(v, str) or not v or "\0" in v:
            raise ConfigError(f"{self._where(key)}: expected a non-empty string, got {v!r}")
        return v

    def path(self, key: str, default: str) -> str:
        v = self.string(key, default)
        if not os.path.isabs(v):
            raise ConfigError(f"{self._where(key)}: {v!r} is not an absolute path")
        return os.path.normpath(v)

    def optional_path(self, key: str) -> str | None:
        if self._raw.get(key) is None:
            self._seen.add(key)
            return None
        return self.path(key, "/")

    def strings(self, key: str, absolute: bool = False) -> tuple[str, ...]:
        v = self._get(key)
        if v is None:
            return ()
        if not isinstance(v, list) or not all(isinstance(s, str) and s and "\0" not in s
                                              for s in v):
            raise ConfigError(f"{self._where(key)}: expected a list of non-empty strings")
        if absolute:
            for s in v:
                if not os.path.isabs(s):
                    raise ConfigError(f"{self._where(key)}: {s!r} is not an absolute path")
            return tuple(os.path.normpath(s) for s in v)
        return tuple(v)

    def done(self) -> None:
        unknown = sorted(set(self._raw) - self._seen)
        if unknown:
            raise ConfigError(f"[{self.name}]: unknown key {unknown[0]!r}")


def parse_child_sections(doc: Mapping[str, Any]) -> ChildConfig:
    f = Section("freeze", doc.get("freeze"))
    freeze = FreezeConfig(
        only=f.strings("only", absolute=True),
        exclude=f.strings("exclude"),
        presync=f.boolean("presync", True),
        rcu_expedited=f.boolean("rcu_expedited", False),
    )
    f.done()
    c = Section("check", doc.get("check"))
    check = CheckConfig(
        mode=c.choice("mode", "default", ("default", "strict")),
        zfs=c.choice("zfs", "ignore", ("ignore", "veto")),
    )
    c.done()
    w = Section("watchdog", doc.get("watchdog"))
    if "cooldown_seconds" in w:
        raise ConfigError("[watchdog] cooldown_seconds: no longer a setting; the frozen-time "
                          "budget (budget_seconds, budget_seconds_per_hour) replaces it")
    max_frozen = w.number("max_frozen_seconds", 60.0, 0.1, 3600.0)
    watchdog = WatchdogConfig(
        max_frozen_seconds=max_frozen,
        budget_seconds=w.number("budget_seconds", max(120.0, max_frozen), max_frozen,
                                86400.0),
        budget_seconds_per_hour=w.number("budget_seconds_per_hour", 240.0, 0.0, 3600.0),
    )
    w.done()
    s = Section("state", doc.get("state"))
    state = StateConfig(dir=s.path("dir", "/run/hv-vss-agent"))
    s.done()
    return ChildConfig(freeze, check, watchdog, state)


def read_toml(path: str) -> dict[str, Any]:
    """Read a config file that root will act on; refuse one others could change.

    Opened once, checked on that descriptor (and every directory above it), and
    parsed from it: nothing can be swapped in between."""
    if not os.path.isabs(path):
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
        with open(fd, "rb", buffering=_BUFFERING) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigError(f"config file {path} is not a regular file")
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8") from None


def load_child_config(path: str | None) -> ChildConfig:
    if path is None:
        return ChildConfig()
    return parse_child_sections(read_toml(path))
