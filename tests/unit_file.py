"""Reading etc/systemd/hv-vss-agent.service the way systemd would, for the tests."""

from __future__ import annotations

import functools
import os
import subprocess

from tests.helpers import REPO

UNIT = os.path.join(REPO, "etc", "systemd", "hv-vss-agent.service")


def directives(path: str = UNIT) -> dict[str, list[str]]:
    """Key -> every value given to it, in order (systemd lets some keys repeat)."""
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if line and not line.startswith(("#", ";", "[")):
                key, _, value = line.partition("=")
                out.setdefault(key.strip(), []).append(value.strip())
    return out


@functools.cache
def _group(name: str) -> frozenset[str]:
    text = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager", name],
                          capture_output=True, text=True, check=True).stdout
    names: set[str] = set()
    for line in text.splitlines()[1:]:
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        names |= _group(word) if word.startswith("@") else {word}
    return frozenset(names)


def syscall_filter(path: str = UNIT) -> frozenset[str]:
    """Every syscall the unit's SystemCallFilter= lines allow (allow lists only)."""
    allowed: set[str] = set()
    for value in directives(path)["SystemCallFilter"]:
        assert not value.startswith("~"), "deny lists are not modelled here"
        for word in value.split():
            allowed |= _group(word) if word.startswith("@") else {word}
    return frozenset(allowed)
