"""The mutation tool (tools/mutation/): its mutants, its bookkeeping, its report, its guard.

`make mutate` itself is long and not part of `make test`; these are the parts
of it that can be checked in seconds.  The guard is checked for real: a
FIFREEZE on a scratch filesystem outside the run's scratch directory is
refused, in an interpreter started as the root child is and in the real
child; / is only ever asked about, never frozen.
"""

from __future__ import annotations

import ast
import glob
import os
import shutil
import subprocess
import textwrap

import pytest

from agent.engine import child_link, child_start
from privileged import wire
from tests.helpers import PY, REPO, assert_writable, write_config
from tools.mutation import guard, tracer
from tools.mutation.__main__ import spread
from tools.mutation.mutants import Mutant, mutants
from tools.mutation.report import BEGIN, END, complete, render, table, update_section
from tools.mutation.results import (
    ERROR,
    KILLED,
    SURVIVED,
    TIMEOUT,
    EquivalentListError,
    Results,
    load_equivalents,
)
from tools.mutation.runner import Outcome, make_venv, unparametrized, verdict_of
from tools.mutation.testmap import CoverageMap, naming_files

SAMPLE = b'''\
"""A module docstring: never mutated."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from os import PathLike

log = logging.getLogger("x")
LIMIT = 1
NAMES = ("a", "b")


def f(a: int, b: int = 3) -> int:
    """A docstring."""
    log.info("a=%d", a + 1)
    if a < b and b != 0:
        a += 2
    total = 0
    for i in range(a):
        if i == 5:
            break
        total = total | i
    label = f"{a - 1}"
    kind = "zfs"
    if kind in ("zfs", ""):
        total -= 1
    g(total, flag=True)
    return -total if not label else total


def g(*args: object, flag: bool = False) -> None:
    return
'''


def by_kind(ms: list[Mutant]) -> dict[str, set[tuple[str, str]]]:
    out: dict[str, set[tuple[str, str]]] = {}
    for m in ms:
        out.setdefault(m.kind, set()).add((" ".join(m.original.split()), m.replacement))
    return out


def test_mutants_of_each_kind():
    got = by_kind(mutants("pkg/sample.py", SAMPLE))
    assert {("a < b", "(a >= b)"), ("a < b", "(a <= b)"), ("b != 0", "(b == 0)"),
            ("i == 5", "(i != 5)"), ('kind in ("zfs", "")', '(kind not in (\'zfs\', \'\'))')
            } <= got["compare"]
    assert ("a < b and b != 0", "(a < b or b != 0)") in got["boolop"]
    assert ("a < b and b != 0", "not (a < b and b != 0)") in got["negate"]
    assert ("not label", "(label)") in got["unary"] and ("-total", "(total)") in got["unary"]
    assert {("1", "2"), ("1", "0"), ("3", "4"), ("2", "3"), ("True", "False"),
            ("False", "True"), ('"zfs"', "''"), ('""', "'X'")} <= got["const"]
    assert {("a += 2", "a -= 2"), ("total -= 1", "total += 1"),
            ("total | i", "(total & i)")} <= got["binop"]
    assert ("break", "continue") in got["loopctl"]
    assert {("g(total, flag=True)", "pass"), ("total = 0", "pass"),
            ("return -total if not label else total", "pass")} <= got["delete"]


def test_what_is_not_mutated():
    ms = mutants("pkg/sample.py", SAMPLE)
    touched = {line for m in ms for line in range(m.line, m.end_line + 1)}
    lines = SAMPLE.decode().splitlines()
    untouched = {n for n, text in enumerate(lines, 1) if any(s in text for s in (
        "docstring", "log.info", "import", "PathLike"))}
    assert touched & untouched == set()
    assert not [m for m in ms if "a - 1" in m.original and m.kind != "delete"]  # f-string
    assert not any(m.kind == "delete" and m.at_import for m in ms)  # NameError at import
    assert not [m for m in ms if m.line == len(lines)]  # the bare return ending g()
    assert {m.original for m in ms if m.at_import} >= {"1", "3", "False"}  # values, defaults


def test_every_mutant_of_the_root_side_changes_only_its_span_and_parses():
    modules = [*glob.glob(os.path.join(REPO, "privileged", "*.py")),
               *glob.glob(os.path.join(REPO, "agent", "kernel", "*.py")),
               os.path.join(REPO, "agent", "engine", "machine.py")]
    ids = set()
    for path in modules:
        with open(path, "rb") as f:
            source = f.read()
        original = ast.dump(ast.parse(source))
        for i, m in enumerate(mutants(os.path.relpath(path, REPO), source)):
            assert m.id not in ids
            ids.add(m.id)
            if i % 10:
                continue  # parsing every mutant of every module would take half a minute
            out = m.apply(source)
            assert out[: m.start] == source[: m.start]
            assert out[len(out) - (len(source) - m.end):] == source[m.end:]
            assert ast.dump(ast.parse(out)) != original, m.id
    assert len(ids) > 1000


def test_ids_stay_when_the_file_changes_elsewhere():
    before = {m.id for m in mutants("pkg/sample.py", SAMPLE) if m.id.split(":")[1] == "f"}
    edited = SAMPLE.replace(b"LIMIT = 1\n", b"LIMIT = 1\nOTHER = 7\n\n\ndef h() -> int:\n"
                                             b"    return OTHER * 2\n")
    after = {m.id for m in mutants("pkg/sample.py", edited) if m.id.split(":")[1] == "f"}
    assert before == after and before


# --- results, equivalents, report ---------------------------------------------------------


def record(m: Mutant, verdict: str, source: str = "s1", context: str = "c1") -> dict:
    return {"id": m.id, "path": m.path, "line": m.line, "verdict": verdict,
            "source_hash": source, "context_hash": context, "covered": True}


def test_results_say_what_a_rerun_may_skip(tmp_path):
    a, b, c, d = mutants("pkg/sample.py", SAMPLE)[:4]
    path = str(tmp_path / "results.jsonl")
    first = Results(path)
    for m, verdict in ((a, KILLED), (b, TIMEOUT), (c, SURVIVED), (d, ERROR)):
        first.add(record(m, verdict))
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"id": "cut short by an interrupt')  # the last line of a killed run
    again = Results(path)
    assert [again.judged(m, "s1", "c1") is not None for m in (a, b, c, d)] == \
        [True, True, True, False]  # an error is run again
    # the tests changed: killed stays killed, a survivor gets another chance
    assert [again.judged(m, "s1", "c2") is not None for m in (a, b, c)] == [True, True, False]
    # the module changed: everything is run again
    assert [again.judged(m, "s2", "c1") for m in (a, b, c)] == [None, None, None]
    again.add(record(c, KILLED, context="c2"))
    assert Results(path).latest[c.id]["verdict"] == KILLED  # the latest line wins
    assert Results(path, fresh=True).latest == {}


def test_verdict_from_pytest_s_exit():
    def v(code, out=""):
        return verdict_of(Outcome(code, out, 1.0))

    assert v(None) == {"verdict": TIMEOUT}
    assert v(0) == {"verdict": SURVIVED}
    assert v(1, "FAILED tests/test_a.py::test_x - assert 1 == 2\n") == \
        {"verdict": KILLED, "killed_by": "tests/test_a.py::test_x"}
    # a test module that no longer imports: pytest finds none of the ids given (exit 4)
    assert v(4, "ERROR tests/test_b.py - ConfigError\nERROR: found no collectors for x\n") == \
        {"verdict": KILLED, "killed_by": "tests/test_b.py"}
    assert v(4, "ERROR: file or directory not found: tests/test_c.py\n")["verdict"] == ERROR
    assert v(5)["verdict"] == ERROR


def test_a_parametrized_test_not_found_under_a_mutant_is_asked_for_by_its_function():
    """Its id may hold bytes made from the mutated constant: the retry names the function."""
    tests = ["tests/test_w.py::test_r[\x01\x83]", "tests/test_w.py::test_r[\x01\x84]",
             "tests/test_w.py::test_plain"]
    assert unparametrized(tests) == ["tests/test_w.py::test_r", "tests/test_w.py::test_plain"]
    assert unparametrized(tests[2:]) == tests[2:]


def test_equivalent_list(tmp_path):
    path = tmp_path / "equivalent.txt"
    path.write_text("# comment\n\npkg/x.py:f:const:0123abcd  the value is never read\n")
    assert load_equivalents(str(path)) == {"pkg/x.py:f:const:0123abcd": "the value is never read"}
    path.write_text("pkg/x.py:f:const:0123abcd\n")
    with pytest.raises(EquivalentListError, match=":1: a mutant id and why"):
        load_equivalents(str(path))
    load_equivalents()  # the tool's own list parses


def test_report_table_and_survivors():
    ms = mutants("pkg/sample.py", SAMPLE)[:6]
    results = {m.id: record(m, v) for m, v in zip(ms, (KILLED, KILLED, TIMEOUT, SURVIVED,
                                                      SURVIVED), strict=False)}
    results[ms[4].id]["covered"] = False
    equivalents = {ms[4].id: "never read"}
    rows = table(ms, results, equivalents)
    # 6 mutants: 2 killed, 1 timed out, 1 survived, 1 equivalent, 1 not run: 3 of 4 caught
    assert rows[2] == "| pkg/sample.py | 6 | 2 | 1 | 1 | 1 | 1 | 75.0% |"
    assert rows[3].startswith("| total | 6 |")
    text = render(ms, results, equivalents)
    assert "## Survivors (1)" in text
    assert f"pkg/sample.py:{ms[3].line}  {ms[3].kind}  {ms[3].description}  [{ms[3].id}]" in text


def test_run_order_is_an_even_sample_of_every_module_at_any_point():
    a = [m for m in mutants("pkg/a.py", SAMPLE)][:8]
    b = [m for m in mutants("pkg/b.py", SAMPLE)][:3]
    order = spread(a + b)
    assert sorted(order, key=id) == sorted(a + b, key=id)
    assert [m.path for m in order[:6]] == ["pkg/a.py", "pkg/b.py"] * 3  # modules in turn
    assert [a.index(m) for m in order if m.path == "pkg/a.py"] == [0, 4, 2, 6, 1, 5, 3, 7]


def test_security_md_table_is_rewritten_between_its_markers_only(tmp_path):
    path = tmp_path / "SECURITY.md"
    path.write_text(f"# S\n\nbefore\n{BEGIN}\nold table\n{END}\nafter\n")
    assert update_section(str(path), ["| new |", "| table |"])
    assert path.read_text() == f"# S\n\nbefore\n{BEGIN}\n| new |\n| table |\n{END}\nafter\n"
    path.write_text("# S\nno markers\n")
    assert not update_section(str(path), ["| new |"])
    assert path.read_text() == "# S\nno markers\n"
    ms = mutants("pkg/sample.py", SAMPLE)[:2]
    assert not complete(ms, {ms[0].id: record(ms[0], KILLED)}, {})
    assert complete(ms, {ms[0].id: record(ms[0], KILLED)}, {ms[1].id: "never read"})
    assert not complete(ms, {m.id: record(m, ERROR) for m in ms}, {})


def test_which_tests_a_mutant_runs_and_in_which_order():
    ms = mutants("pkg/sample.py", SAMPLE)
    body = next(m for m in ms if m.original == "a < b" and m.kind == "compare")
    at_import = next(m for m in ms if m.at_import)
    elsewhere = next(m for m in ms if m.original == "i == 5" and m.kind == "compare")
    tests = {t: {"order": i, "seconds": s, "failed": False, "markers": mk}
             for i, (t, s, mk) in enumerate([
                 ("tests/test_e2e.py::test_one", 1.0, []),
                 ("tests/test_sample.py::test_b", 5.0, []),
                 ("tests/test_sample.py::test_a", 0.5, []),
                 ("tests/test_e2e.py::test_soak", 0.1, ["slow"]),
                 ("tests/test_e2e.py::test_broken", 0.1, []),
                 ("tests/test_other.py::test_c", 0.2, []),
                 ("tests/test_sample.py::test_reads_a_constant", 0.1, [])])}
    hits = {("-", "pkg/sample.py", at_import.line)}  # imported at collection: no test's
    for t in tests:
        if not t.endswith(("test_c", "test_reads_a_constant")):
            hits.add((t, "pkg/sample.py", body.line))
    hits.add(("tests/test_other.py::test_c", "pkg/sample.py", 40))
    tmap = CoverageMap.build(hits, tests, "/nonexistent", ["pkg/sample.py"])
    tmap.direct = {"pkg/sample.py": {"tests/test_sample.py"}}
    tmap.broken = {"tests/test_e2e.py::test_broken": "fails unmutated"}
    # its line's tests; the module's own test file first, in pytest's order; no slow, no broken
    assert tmap.tests_for(body) == ["tests/test_sample.py::test_b", "tests/test_sample.py::test_a",
                                    "tests/test_e2e.py::test_one"]
    # tests that killed the most mutants of the module so far, per second, go first
    assert tmap.tests_for(body, {"tests/test_e2e.py::test_one": 3,  # 1.5 a second
                                 "tests/test_sample.py::test_b": 6,  # 1 a second
                                 "tests/test_sample.py::test_a": 1})[:3] == [
        "tests/test_e2e.py::test_one", "tests/test_sample.py::test_b",
        "tests/test_sample.py::test_a"]
    # at import: every test that ran anything of the module, and the module's own test files
    # whole (a test that reads a constant runs none of its lines)
    assert set(tmap.tests_for(at_import)) == {*tmap.tests_for(body), "tests/test_other.py::test_c",
                                              "tests/test_sample.py::test_reads_a_constant"}
    # on a line no test ran: none (it survives), or the module's to check the map
    assert not tmap.covered(elsewhere) and tmap.covered(body)
    assert tmap.tests_for(elsewhere) == []
    tmap.run_uncovered = True
    assert set(tmap.tests_for(elsewhere)) == {*tmap.tests_for(body), "tests/test_other.py::test_c"}
    assert tmap.budget(["tests/test_sample.py::test_a"]) == 61.5
    tmap.with_slow = True
    assert "tests/test_e2e.py::test_soak" in tmap.tests_for(body)
    # a test that failed while traced: its lines are incomplete, so it runs for the module
    tmap.tests["tests/test_other.py::test_c"]["failed"] = True
    assert "tests/test_other.py::test_c" in tmap.tests_for(body)


def test_a_function_run_while_pytest_collects_runs_as_an_import_does():
    """A function a module calls at import (a platform table's constructor) runs its lines
    once per process: in pytest's own, while it collects, no test's.  Every test of the
    module depends on them, as on a constant."""
    ms = mutants("pkg/sample.py", SAMPLE)
    called = next(m for m in ms if m.original == "i == 5" and m.kind == "compare")
    tests = {t: {"order": i, "seconds": 1.0, "failed": False, "markers": []}
             for i, t in enumerate(["tests/test_sample.py::test_a", "tests/test_other.py::test_c"])}
    hits = {("-", "pkg/sample.py", called.line),
            ("tests/test_other.py::test_c", "pkg/sample.py", 40)}
    tmap = CoverageMap.build(hits, tests, "/nonexistent", ["pkg/sample.py"])
    tmap.direct = {"pkg/sample.py": {"tests/test_sample.py"}}
    assert not called.at_import and not tmap.covered(called)
    assert set(tmap.tests_for(called)) == set(tests)


def test_a_changed_test_file_replaces_only_its_own_tests_in_the_map(tmp_path):
    def info(i: int) -> dict[str, object]:
        return {"order": i, "seconds": 1.0, "failed": False, "markers": []}

    old = CoverageMap.build({("tests/test_a.py::t1", "m.py", 3), ("tests/test_b.py::t2", "m.py", 3),
                             ("tests/test_b.py::t2", "m.py", 4)},
                            {"tests/test_a.py::t1": info(0), "tests/test_b.py::t2": info(1)},
                            str(tmp_path), ["m.py"])
    old.files = {"tests/test_a.py": "a1", "tests/test_b.py": "b1"}
    old.broken = {"tests/test_b.py::t2": "fails unmutated"}
    old.drop_files(["tests/test_b.py"])
    assert old.lines == {"m.py": {3: {"tests/test_a.py::t1"}, 4: set()}}
    assert set(old.tests) == {"tests/test_a.py::t1"} and old.broken == {}
    assert old.files == {"tests/test_a.py": "a1"}
    new = CoverageMap.build({("tests/test_b.py::t3", "m.py", 5)},
                            {"tests/test_b.py::t3": info(0)}, str(tmp_path), ["m.py"])
    old.merge(new)
    assert old.lines == {"m.py": {3: {"tests/test_a.py::t1"}, 4: set(),
                                  5: {"tests/test_b.py::t3"}}}
    assert set(old.tests) == {"tests/test_a.py::t1", "tests/test_b.py::t3"}
    path = str(tmp_path / "map.json")
    old.save(path, "k")
    again = CoverageMap.load(path, "k")
    assert again is not None and again.lines == old.lines and again.files == old.files
    assert CoverageMap.load(path, "another tree") is None


def test_unit_tests_of_a_module_are_the_files_that_import_it(tmp_path):
    (tmp_path / "tests").mkdir()
    for name, text in {"test_a.py": "from privileged.wire import Op\n",
                       "test_b.py": "from privileged import (\n    config,\n    wire,\n)\n",
                       "test_c.py": "from agent import notify_wire  # wire, in a comment\n",
                       "test_d.py": "import agent.engine.machine as E\n"}.items():
        (tmp_path / "tests" / name).write_text(text)
    assert naming_files(str(tmp_path), ["privileged/wire.py", "agent/engine/machine.py"]) == {
        "privileged/wire.py": {"tests/test_a.py", "tests/test_b.py"},
        "agent/engine/machine.py": {"tests/test_d.py"}}


# --- the guard -----------------------------------------------------------------------------


def test_guard_import_comes_before_the_package_s_own_code():
    text = b'"""Doc."""\nfrom __future__ import annotations\n\nimport os\n'
    assert guard.with_import(text).decode().splitlines() == [
        '"""Doc."""', "from __future__ import annotations", guard.IMPORT_LINE.strip(), "",
        "import os"]
    assert guard.with_import(b"x = 1").decode() == guard.IMPORT_LINE + "x = 1\n"


def copy_packages(top: str, packages: tuple[str, ...] = guard.PACKAGES) -> str:
    """Our packages copied under `top`, as a mutation run's copy has them."""
    for package in packages:
        shutil.copytree(os.path.join(REPO, package), os.path.join(top, package),
                        ignore=shutil.ignore_patterns("__pycache__"))
    return top


def guarded_copy(top: str, allowed: str) -> str:
    """privileged/ alone, copied under `top`, with the guard a mutation run gives it."""
    copy_packages(top, ("privileged",))
    guard.install(top, allowed, os.path.join(top, "guard.log"), packages=("privileged",))
    return top


def child_from(top: str, monkeypatch: pytest.MonkeyPatch, config: str) -> child_link.ChildLink:
    """The real root child, its packages imported from the copy at `top`."""
    monkeypatch.setattr(child_start, "child_bootstrap", lambda: (
        f"import sys; sys.path.insert(0, {top!r}); "
        "from privileged.child import main; sys.exit(main())"))
    return child_link.ChildLink.spawn(config, None)


GUARD_PROBE = """\
import fcntl, os, sys
sys.path.insert(0, sys.argv[1])
import privileged
from privileged import _mutation_guard as g
root = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
print("/", g.refusal(root) is not None)  # asked, never tried
for path in sys.argv[2:]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, 0xC0045877, 0)  # FIFREEZE
        fcntl.ioctl(fd, 0xC0045878, 0)  # FITHAW
        print(path, "froze")
    except PermissionError as e:
        print(path, "refused", e)
    try:
        fcntl.ioctl(fd, 0xC0045878, 0)  # FITHAW of what is not frozen: EINVAL, if let through
    except PermissionError as e:
        print(path, "refused", e)
    except OSError as e:
        print(path, "thaw let through:", e.strerror)
"""


def test_guard_refuses_a_freeze_outside_the_run_s_scratch_directory(workdir, make_fs):
    """Started as the root child is (-I -B -S, empty environment): a scratch filesystem
    inside the allowed directory can be frozen, one outside it cannot."""
    os.makedirs(os.path.join(workdir, "allowed"))
    inside = make_fs("ext4", name="allowed/inside")
    outside = make_fs("ext4", name="outside")
    top = guarded_copy(os.path.join(workdir, "copy"), os.path.join(workdir, "allowed"))
    out = subprocess.run([PY, "-I", "-B", "-S", "-c", GUARD_PROBE, top, inside.mountpoint,
                          outside.mountpoint], capture_output=True, text=True, timeout=60,
                         check=True, env={})
    lines = out.stdout.splitlines()
    assert lines[0] == "/ True"
    assert lines[1:3] == [f"{inside.mountpoint} froze",
                          f"{inside.mountpoint} thaw let through: Invalid argument"]
    assert lines[3].startswith(f"{outside.mountpoint} refused")
    assert f"FIFREEZE: {outside.mountpoint} is outside {workdir}/allowed" in lines[3]
    assert f"FITHAW: {outside.mountpoint} is outside {workdir}/allowed" in lines[4]
    assert_writable(outside.mountpoint, 5)
    with open(os.path.join(top, "guard.log"), encoding="utf-8") as f:
        assert "refused FIFREEZE" in f.read()


def test_guard_stops_the_real_child_freezing_outside_the_scratch_directory(
        workdir, make_fs, monkeypatch, caplog):
    """A mutant that makes the child freeze a filesystem the run did not make for it (here
    one outside the allowed directory, named in its config): the guarded child answers
    FAILED with EPERM, through its seccomp filter, and the filesystem stays writable."""
    outside = make_fs("ext4", name="outside")
    os.makedirs(os.path.join(workdir, "allowed"))
    top = guarded_copy(os.path.join(workdir, "copy"), os.path.join(workdir, "allowed"))
    link = child_from(top, monkeypatch, write_config(os.path.join(workdir, "c.toml"),
                                                     [outside.mountpoint], workdir))
    try:
        assert link.wait_hello().targets == 1
        result, _ = link.request(wire.Op.FREEZE)
        assert (result.status, result.errno) == (wire.Status.FAILED, 1)  # EPERM
        assert_writable(outside.mountpoint, 5)
        assert link.request(wire.Op.QUIT)[0].op is wire.Op.QUIT
    finally:
        link.close()
        link.exit_status(10)
    # The child cannot write the guard's log (Landlock and its filter refuse any write
    # open): the refusal reaches the run through the child's own log line.
    assert f"mutation guard refused FIFREEZE: {outside.mountpoint} is outside" in caplog.text


def test_guard_source_is_self_contained():
    """The guard imports nothing from the tree it guards (whose code is mutated)."""
    tree = ast.parse(guard.source("/var/tmp/x", "/var/tmp/x.log"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported == {"errno", "fcntl", "os"}
    assert textwrap.dedent(guard.IMPORT_LINE).startswith("import privileged._mutation_guard")


def test_the_tracer_follows_the_thaw_guard_a_process_the_child_forks(workdir, make_fs,
                                                                     monkeypatch):
    """The guard's loop runs only in the guard, a fork of the root child: its lines are
    mapped to the test that started the child, so its mutants are run, not left as
    survivors no test was seen to reach."""
    fs = make_fs("ext4")
    top = copy_packages(os.path.join(workdir, "copy"))
    out = os.path.join(workdir, "trace")
    tracer.install(top, ["privileged/freezer.py"], out)
    link = child_from(top, monkeypatch, write_config(os.path.join(workdir, "c.toml"),
                                                     [fs.mountpoint], workdir))
    try:
        link.wait_hello()
        assert link.request(wire.Op.FREEZE)[0].status is wire.Status.OK
        assert link.request(wire.Op.THAW)[0].status is wire.Status.OK
        assert link.request(wire.Op.QUIT)[0].op is wire.Op.QUIT
    finally:
        link.close()
        link.exit_status(10)
    assert traced(out, "privileged/freezer.py", "fds += passed")  # only the guard runs it


def traced(out: str, module: str, text: str) -> bool:
    """Whether the tracer writing to `out` saw the one line of `module` that holds `text`."""
    with open(os.path.join(REPO, module), encoding="utf-8") as f:
        lines = [n for n, line in enumerate(f.read().splitlines(), 1) if text in line]
    assert len(lines) == 1
    return (module, lines[0]) in {(file, line) for _, file, line in tracer.read(out)}


THREADS_PROBE = """\
import sys
sys.path.insert(0, sys.argv[1])
from privileged import concurrent
concurrent.each(range(3), lambda i: None, eager=True)
"""


def test_the_tracer_follows_threads_started_without_threading(workdir):
    """concurrent.each() starts its workers with _thread (the child does not import
    threading): the lines only they run are mapped too, not left as survivors no test was
    seen to reach."""
    top = copy_packages(os.path.join(workdir, "copy"))
    out = os.path.join(workdir, "trace")
    tracer.install(top, ["privileged/concurrent.py"], out)
    subprocess.run([PY, "-I", "-c", THREADS_PROBE, top], check=True, timeout=60)
    assert traced(out, "privileged/concurrent.py", "running.release()  #")  # workers only


def test_the_daemon_started_by_path_from_a_guarded_copy_finds_its_guard(workdir):
    """The unit, the demo and the tests start the daemon as `python -I -S agent/__main__.py`;
    in a mutation run's copy, agent/__init__.py imports the guard from privileged first
    thing, so privileged must be loaded before agent (else every test that starts the real
    agent fails on the unmutated copy and is left out of the run)."""
    top = copy_packages(os.path.join(workdir, "copy"))
    guard.install(top, os.path.join(workdir, "allowed"), os.path.join(workdir, "guard.log"))
    proc = subprocess.run([PY, "-I", "-S", os.path.join(top, "agent", "__main__.py"), "--help"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def test_a_copy_s_virtualenv_holds_what_the_daemon_imports_without_its_pth(tmp_path):
    """The daemon starts with -S and appends its virtualenv's site-packages once
    unprivileged, without running .pth files: a copy's virtualenv must hold the packages
    themselves, not a .pth that names the worktree's (else every test that starts the real
    agent fails on the unmutated copy and is left out of the run)."""
    venv = str(tmp_path / "venv")
    make_venv(venv, REPO)
    python = os.path.join(venv, "bin", "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True, check=True,
                             timeout=60).stdout.strip()
    proc = subprocess.run([python, "-I", "-S", "-c", "import sys; sys.path.append(sys.argv[1]); "
                           "import multiprocessing_logging, psutil", purelib],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def test_a_stopped_run_puts_rcu_expedited_back(tmp_path, monkeypatch):
    """A mutant's test may leave /sys/kernel/rcu_expedited at 1 (its child killed while it
    froze, with no successor to read the crash record): the run sets it back to what it
    was when it began, on its way out, interrupted or not."""
    from tools.mutation import __main__ as tool
    from tools.mutation import runner

    before = runner.rcu_expedited()
    assert before is not None  # this kernel has the setting: the test would prove nothing

    class NoCopy:
        def __init__(self, path: str) -> None:
            self.path = path

        def create(self, files: object, modules: object) -> NoCopy:
            return self

    def stopped_in_the_middle(*args: object, **kw: object) -> None:
        with open(runner.RCU_EXPEDITED, "w", encoding="ascii") as f:
            f.write("0" if before == "1" else "1")
        raise KeyboardInterrupt

    monkeypatch.setattr(tool, "Copy", NoCopy)
    monkeypatch.setattr(tool, "check_copy", lambda copy: None)
    monkeypatch.setattr(tool, "coverage_map", stopped_in_the_middle)
    args = tool.parser().parse_args(["-j", "1"])
    ms = tool.mutants_of_all(["privileged/budget.py"])[:1]
    try:
        with pytest.raises(SystemExit):
            tool.run(args, ["privileged/budget.py"], ms, {},
                     Results(str(tmp_path / "results.jsonl"), fresh=True))
        assert runner.rcu_expedited() == before
    finally:
        runner.restore_rcu_expedited(before)
