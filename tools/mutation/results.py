"""The results file (one JSON object per judged mutant) and the equivalent-mutant list.

A run appends a line as each mutant is judged, so an interrupted run loses at
most the mutants in flight.  A later run skips a mutant whose latest result
still holds:

  killed, timed out  while its module's source is the same (the source hash);
  survived           while its module's source and everything around it (the
                     other modules, the tests, the tools: the context hash)
                     are the same, so a survivor is tried again once a test
                     has been added or changed;
  error              never: it is run again.

equivalent.txt lists mutants that cannot be killed because they do not
change behaviour: `<mutant id> <why>`, one per line, `#` for comments.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from typing import Any

from tools.mutation.mutants import Mutant

KILLED, TIMEOUT, SURVIVED, EQUIVALENT, ERROR = "killed", "timeout", "survived", "equivalent", \
    "error"
EQUIVALENT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "equivalent.txt")


class EquivalentListError(Exception):
    pass


def load_equivalents(path: str = EQUIVALENT_FILE) -> dict[str, str]:
    """Mutant id -> why it is equivalent."""
    out: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return out
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) < 2:
            raise EquivalentListError(f"{path}:{n}: a mutant id and why it is equivalent, "
                                      f"got {line!r}")
        out[parts[0]] = parts[1]
    return out


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def file_digests(tree: str, files: Iterable[str]) -> dict[str, str]:
    """The files that can change a verdict: code, tests, tools, pytest's configuration;
    not the benchmarks, and not this tool or its own tests."""
    out = {}
    for rel in sorted(files):
        if rel.endswith((".py", ".toml")) and not rel.startswith(
                ("bench/", "tools/mutation/", "tests/test_mutation_tool.py")):
            with open(os.path.join(tree, rel), "rb") as f:
                out[rel] = digest(f.read())
    return out


def context_hashes(digests: dict[str, str], modules: Iterable[str]) -> dict[str, str]:
    """Per module: a hash of every other file that can change a verdict."""
    out = {}
    for module in modules:
        h = hashlib.sha256()
        for rel, d in digests.items():
            if rel != module:
                h.update(f"{rel}\0{d}\0".encode())
        out[module] = h.hexdigest()[:16]
    return out


def tree_hash(digests: dict[str, str]) -> str:
    return digest("".join(f"{rel}\0{d}\0" for rel, d in digests.items()).encode())


class Results:
    def __init__(self, path: str, fresh: bool = False) -> None:
        self.path = path
        self.latest: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        if fresh:
            return
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue  # a line cut short by an interrupted run
                    if isinstance(record, dict) and "id" in record:
                        self.latest[record["id"]] = record
        except FileNotFoundError:
            pass

    def judged(self, m: Mutant, source_hash: str, context_hash: str) -> dict[str, Any] | None:
        r = self.latest.get(m.id)
        if r is None or r.get("source_hash") != source_hash:
            return None
        if r["verdict"] in (KILLED, TIMEOUT):
            return r
        if r["verdict"] == SURVIVED and r.get("context_hash") == context_hash:
            return r
        return None

    def add(self, record: dict[str, Any]) -> None:
        with self._lock:
            self.latest[record["id"]] = record
            with open(self.path, "ab") as f:
                # after a line an interrupted run cut short, start a new one
                if f.tell() and not _ends_with_newline(self.path):
                    f.write(b"\n")
                f.write(json.dumps(record, sort_keys=True).encode() + b"\n")


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
