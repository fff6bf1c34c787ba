"""The configuration file as the parent validates it, before it starts the root child.

The parent reads the whole file with tomllib and checks every section; the
child's sections with the child's own key readers (privileged/child_config.py),
so a bad value is reported once, early, in the words the child would use.
Once unprivileged it reads the text again with the child's TOML reader
(agent/engine/daemon.py), so that a file the child would read differently,
or not at all, is refused with the line before anything is served.  Never
loaded by the root child.
"""

from __future__ import annotations

import tomllib
from typing import Any

from privileged.child_config import (
    CHILD_SECTIONS,
    ChildConfig,
    ConfigError,
    Table,
    parse_child_sections,
    read_config,
)

__all__ = ["CHILD_SECTIONS", "ChildConfig", "ConfigError", "Section", "parse_child_sections",
           "read_toml"]


class Section(Table):
    """The child's key readers, and those only the parent's sections need."""

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        v = self.get(key, default, "an integer",
                     lambda v: isinstance(v, int) and not isinstance(v, bool))
        if not lo <= v <= hi:
            raise ConfigError(f"[{self.name}] {key}: {v} is outside {lo}..{hi}")
        return v

    def string(self, key: str, default: str) -> str:
        return self.get(key, default, "a non-empty string",
                        lambda v: isinstance(v, str) and v != "" and "\0" not in v)

    def optional_path(self, key: str) -> str | None:
        if self.raw.get(key) is None:
            self.seen.add(key)
            return None
        return self.path(key, "/")


def read_toml(path: str) -> tuple[dict[str, Any], str]:
    """A config file that root will act on (refused if others could change it): the
    document, as tomllib reads it, and its text."""
    text = read_config(path)
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
