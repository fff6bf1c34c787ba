"""Which tests a mutant runs, and in which order.

From the coverage run (tracer.py): the tests that executed each line of each
target module, in pytest's process or in any process a test started (the
root child, the daemon).  A mutant runs

  - inside a function: the tests that ran any line it changes;
  - at import (a constant in a table, an enum value, a default), or in a
    function pytest's own process ran while it collected (called at import,
    such as a platform table's constructor): every test that ran any line of
    its module, and its module's test files (import happens once per process,
    so its lines say little about who depends on them);
  - and in any case the tests that failed while traced (their lines are
    incomplete, tracer.py) and ran any line of its module.

A mutant inside a function on a line no test ran is not run: it survives, and
the report says "no test runs this line" (with --run-uncovered it is run
against its module's tests instead, to check the map).
    Import happens once per process, so its lines say little about who
    depends on them; and a line seen by no test may still be run by one the
    tracer lost (a process killed between two flushes).

Once a run has killed mutants of a module, the tests that killed the most of
them per second they take go first for its next mutants: a test that notices
one change in a module often notices the next.

Not run at all: tests marked slow (the soak test, minutes per run; `--with-slow`
brings it back), tests that fail on the unmutated copy (listed in the report),
and EXCLUDED below.  Order, so that a mutant is killed early (pytest -x): first
the test files that name the module (its unit tests), then the others, files
by the time their selected tests took in the coverage run; within a file, the
order pytest ran them.
"""

from __future__ import annotations

import ast
import json
import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from tools.mutation.mutants import Mutant
from tools.mutation.tracer import COLLECTION

# Tests whose verdict says nothing about a mutant.
EXCLUDED = {
    "tests/test_security_md.py::test_root_lines_of_code_are_the_ones_the_tool_counts":
        "counts the source's code lines (SECURITY.md's figure), which a mutant changes",
    "tests/test_attack_child.py::test_enough_frames_were_thrown":
        "counts the frames the module's other tests threw: fails when run without them",
}
# Test files never run by a mutation run (not even traced).
IGNORED_FILES = {
    "tests/test_mutation_tool.py": "the tool's own tests",
    "tests/test_systemd_container.py":
        "installs the tree into a container and boots it: minutes, its processes untraced",
}
SLOW_MARKERS = frozenset({"slow"})


@dataclass
class CoverageMap:
    lines: dict[str, dict[int, set[str]]]  # module -> line -> tests
    tests: dict[str, dict[str, object]]  # test -> order, seconds, failed, markers
    direct: dict[str, set[str]]  # module -> test files that name it
    broken: dict[str, str] = field(default_factory=dict)  # test -> why it is not run
    files: dict[str, str] = field(default_factory=dict)  # test file -> digest when traced
    with_slow: bool = False
    run_uncovered: bool = False

    # --- building -----------------------------------------------------------------------

    @classmethod
    def build(cls, hits: set[tuple[str, str, int]], tests: dict[str, dict[str, object]],
              tree: str, modules: list[str]) -> CoverageMap:
        lines: dict[str, dict[int, set[str]]] = {m: defaultdict(set) for m in modules}
        for test, module, line in hits:  # COLLECTION is kept too, as if a test (tests_for)
            if module in lines:
                lines[module][line].add(test)
        return cls({m: dict(v) for m, v in lines.items()}, tests, naming_files(tree, modules))

    def usable(self, test: str) -> bool:
        info = self.tests.get(test)
        if info is None or test in self.broken or test in EXCLUDED:
            return False
        markers = info.get("markers") or []
        assert isinstance(markers, list)
        return self.with_slow or not SLOW_MARKERS & set(markers)

    # --- choosing -----------------------------------------------------------------------

    def module_tests(self, module: str) -> set[str]:
        return {t for tests in self.lines.get(module, {}).values() for t in tests}

    def line_tests(self, m: Mutant) -> set[str]:
        by_line = self.lines.get(m.path, {})
        return {t for line in range(m.line, m.end_line + 1) for t in by_line.get(line, ())}

    def covered(self, m: Mutant) -> bool:
        return any(self.usable(t) for t in self.line_tests(m))

    def tests_for(self, m: Mutant, killers: Mapping[str, int] | None = None) -> list[str]:
        """The tests to run `m` against; none for a line no test runs (unless
        run_uncovered: then the module's).  `killers`: how many mutants of the module each
        test has killed so far; the best go first."""
        module = self.module_tests(m.path)
        at_import = m.at_import or COLLECTION in self.line_tests(m)
        if not at_import and not self.covered(m) and not self.run_uncovered:
            return []
        if at_import:  # and the module's own test files: reading a constant runs no line
            direct = self.direct.get(m.path, set())
            chosen = module | {t for t in self.tests if t.split("::", 1)[0] in direct}
        elif not self.covered(m):
            chosen = module
        else:  # and those whose lines are incomplete: they failed while traced
            chosen = self.line_tests(m) | {t for t in module if self.tests.get(t, {}).get("failed")}
        ordered = self.ordered({t for t in chosen if self.usable(t)}, m.path)
        if killers:  # kills per second it takes; stable: the others keep their order
            ordered.sort(key=lambda t: -killers.get(t, 0) / (1.0 + self.seconds(t)))
        return ordered

    def ordered(self, tests: set[str], module: str) -> list[str]:
        by_file: dict[str, list[str]] = defaultdict(list)
        for t in tests:
            by_file[t.split("::")[0]].append(t)
        direct = self.direct.get(module, set())

        def file_key(f: str) -> tuple[int, float, str]:
            return (0 if f in direct else 1, sum(self.seconds(t) for t in by_file[f]), f)

        out: list[str] = []
        for f in sorted(by_file, key=file_key):
            out += sorted(by_file[f], key=self.order)
        return out

    def seconds(self, test: str) -> float:
        v = self.tests.get(test, {}).get("seconds", 0.0)
        return float(v) if isinstance(v, int | float) else 0.0

    def order(self, test: str) -> int:
        v = self.tests.get(test, {}).get("order", 0)
        return int(v) if isinstance(v, int) else 0

    def budget(self, tests: list[str]) -> float:
        """Seconds a mutant may take before it counts as timed out."""
        return 60.0 + 3.0 * sum(self.seconds(t) for t in tests)

    # --- kept up to date -----------------------------------------------------------------

    def drop_files(self, files: list[str]) -> None:
        """Forget what the tests of `files` ran (they changed, or are gone)."""
        gone = set(files)

        def kept(test: str) -> bool:
            return test.split("::", maxsplit=1)[0] not in gone

        self.tests = {t: v for t, v in self.tests.items() if kept(t)}
        self.broken = {t: v for t, v in self.broken.items() if kept(t)}
        self.lines = {m: {n: {t for t in ts if kept(t)} for n, ts in v.items()}
                      for m, v in self.lines.items()}
        self.files = {f: d for f, d in self.files.items() if f not in gone}

    def merge(self, other: CoverageMap) -> None:
        """Add what a run of some test files found (their tests are not in this map)."""
        self.tests.update(other.tests)
        self.broken.update(other.broken)
        for module, by_line in other.lines.items():
            mine = self.lines.setdefault(module, {})
            for n, ts in by_line.items():
                mine.setdefault(n, set()).update(ts)
        self.direct = other.direct  # made from the test files as they are now

    # --- stored -------------------------------------------------------------------------

    def save(self, path: str, key: str) -> None:
        data = {"key": key, "tests": self.tests, "files": self.files,
                "direct": {m: sorted(v) for m, v in self.direct.items()},
                "broken": self.broken,
                "lines": {m: {str(n): sorted(t) for n, t in v.items()}
                          for m, v in self.lines.items()}}
        tmp = path + ".new"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, key: str) -> CoverageMap | None:
        """The map stored at `path` if it was made for `key` (the tree's hash), else None."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
        if data.get("key") != key:
            return None
        lines = {m: {int(n): set(t) for n, t in v.items()} for m, v in data["lines"].items()}
        return cls(lines, data["tests"], {m: set(v) for m, v in data["direct"].items()},
                   dict(data.get("broken", {})), dict(data.get("files", {})))


def naming_files(tree: str, modules: list[str]) -> dict[str, set[str]]:
    """Per module, the test files that import it or something from it (its unit tests)."""
    tests_dir = os.path.join(tree, "tests")
    imports: dict[str, set[str]] = {}
    for name in sorted(os.listdir(tests_dir) if os.path.isdir(tests_dir) else []):
        if not (name.startswith("test_") and name.endswith(".py")):
            continue
        with open(os.path.join(tests_dir, name), encoding="utf-8") as f:
            tree_ = ast.parse(f.read())
        found = imports.setdefault(f"tests/{name}", set())
        for node in ast.walk(tree_):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
    out: dict[str, set[str]] = {}
    for module in modules:
        dotted = module.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        out[module] = {f for f, names in imports.items() if dotted in names}
    return out
