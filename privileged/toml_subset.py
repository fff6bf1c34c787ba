"""The root child's TOML reader: the configuration file as text, read to a document.

It reads without tomllib, which would load some thirty standard modules (re,
datetime, typing ...) into root, a plain subset of TOML, everything the
agent's own keys need: [table] headers, bare keys, true and false, decimal
integers and floats, strings in double quotes without backslash escapes or
in single quotes, and lists of these (over several lines if need be);
comments and blank lines anywhere.  Anything else (dotted or quoted keys,
inline tables, multi-line strings, escapes, dates, hexadecimal, inf,
underscores in numbers) is refused with its line number, never read
differently: what it accepts, tomllib reads to the same values
(tests/test_fuzz_parsers.py compares the two).  The parent reads the file
with tomllib as root, and once unprivileged reads it with this reader too
and stops if the two differ (agent/engine/daemon.py), before it serves.
"""

from __future__ import annotations

from privileged.child_config import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_DIGITS = frozenset("0123456789")
_NUMBER = _DIGITS | frozenset("+-.eE")
Value = bool | int | float | str | list["Value"] | dict[str, "Value"]


def parse_toml(text: str, path: str) -> dict[str, Value]:
    """The document as tomllib reads it, or ConfigError naming the line it cannot read."""
    try:
        return _Reader(text.replace("\r\n", "\n")).document()
    except _Unread as e:
        raise ConfigError(f"config file {path}, line {e.args[0]}: {e.args[1]} (the agent "
                          "reads plain TOML: see CONFIGURATION in hv-vss-agent(8))") from None


class _Unread(Exception):
    """(line, what): where the reader stopped, and why."""


class _Reader:
    def __init__(self, text: str) -> None:
        self.text, self.at = text, 0
        controls = [i for i, c in enumerate(text) if (c < " " and c not in "\t\n") or c == "\x7f"]
        if controls:
            self.at = controls[0]
            self.fail(f"control character {text[self.at]!r}")

    def fail(self, what: str) -> NoReturn:
        raise _Unread(self.text.count("\n", 0, self.at) + 1, what)

    def peek(self) -> str:
        return self.text[self.at:self.at + 1]

    def skip(self, newlines: bool) -> None:
        """Spaces, tabs and comments; newlines too if `newlines`."""
        while c := self.peek():
            if c == "#":
                end = self.text.find("\n", self.at)
                self.at = len(self.text) if end < 0 else end
            elif c in " \t" or (newlines and c == "\n"):
                self.at += 1
            else:
                return

    def expect(self, c: str) -> None:
        if self.peek() != c:
            self.fail(f"expected {c!r}")
        self.at += 1

    def key(self) -> str:
        start = self.at
        while self.peek() in _BARE:
            self.at += 1
        if self.at == start:
            self.fail("expected a bare key or table name (letters, digits, _ and -)")
        return self.text[start:self.at]

    def document(self) -> dict[str, Value]:
        doc: dict[str, Value] = {}
        table = doc
        while True:
            self.skip(newlines=True)
            if not self.peek():
                return doc
            if self.peek() == "[":
                self.at += 1
                self.skip(newlines=False)
                name = self.key()
                self.skip(newlines=False)
                self.expect("]")
                if name in doc:
                    self.fail(f"[{name}] appears twice")
                doc[name] = table = {}
            else:
                key = self.key()
                self.skip(newlines=False)
                self.expect("=")
                self.skip(newlines=False)
                if key in table:
                    self.fail(f"{key} is set twice")
                table[key] = self.value()
            self.skip(newlines=False)
            if self.peek() not in ("", "\n"):
                self.fail("expected the end of the line")

    def value(self) -> Value:
        c = self.peek()
        if c == "[":
            self.at += 1
            items: list[Value] = []
            while True:
                self.skip(newlines=True)
                if self.peek() == "]":
                    self.at += 1
                    return items
                items.append(self.value())
                self.skip(newlines=True)
                if self.peek() != "]":
                    self.expect(",")
        if c in ("'", '"'):
            end = self.text.find(c, self.at + 1)
            s = self.text[self.at + 1:end]
            if self.text.startswith(c * 3, self.at):
                self.fail("a multi-line string")
            if end < 0 or "\n" in s:
                self.fail("a string without its closing quote")
            if c == '"' and "\\" in s:
                self.fail("a backslash in a \"string\" (write it as a 'literal string')")
            self.at = end + 1
            return s
        start = self.at
        while self.peek() not in ("", " ", "\t", "\n", "#", ",", "]"):
            self.at += 1
        word = self.text[start:self.at]
        number = _number(word)
        if word in ("true", "false"):
            return word == "true"
        if number is not None:
            return number
        self.at = start
        self.fail(f"{word!r} is not a value read here (true, false, a number, a string, "
                  "a list)" if word else "expected a value")


def _number(word: str) -> int | float | None:
    """A decimal integer or float as TOML writes it (no leading zero, digits on both sides
    of a point), or None."""
    digits = word[1:] if word[:1] in ("+", "-") else word
    if not set(word) <= _NUMBER or digits[:1] not in _DIGITS or (
            digits[:1] == "0" and digits[1:2] in _DIGITS) or any(
            digits[i - 1] not in _DIGITS or digits[i + 1:i + 2] not in _DIGITS
            for i, d in enumerate(digits) if d == "."):
        return None
    try:
        return float(word) if set(word) & {".", "e", "E"} else int(word)
    except ValueError:
        return None
