"""`make mutate`: python -m tools.mutation [options].  Linux, as root.

Mutates privileged/, agent/kernel/ and agent/engine/machine.py (or the --module
paths), runs each mutant against the tests that cover it in copies of the
tree, two at a time, and prints the table per module and the survivors.
Results are kept in .mutation/results.jsonl: run it again and only mutants
not judged for the current source are run.  See tools/mutation/__init__.py.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, NoReturn

from tools.mutation import report
from tools.mutation.mutants import Mutant, mutants
from tools.mutation.results import (
    EQUIVALENT_FILE,
    EquivalentListError,
    Results,
    context_hashes,
    digest,
    file_digests,
    load_equivalents,
    tree_hash,
)
from tools.mutation.runner import (
    TOP,
    Copy,
    Job,
    RunError,
    check_copy,
    coverage_run,
    rcu_expedited,
    restore_rcu_expedited,
    run_workers,
    tree_files,
)
from tools.mutation.testmap import EXCLUDED, IGNORED_FILES, CoverageMap

# Part of the coverage map's key: a map made by an older tool is made again.  2: the
# daemon's processes traced too (they ran the worktree's code before); 3: copies of our
# packages that tests make; 4: threads started with _thread (the child's freeze workers);
# 5: the thaw guard, which closes every descriptor but its link, keeps the tracer's;
# 6: what pytest's process runs while it collects is kept (functions called at import).
MAP_FORMAT = 6
DEFAULT_MODULES = ("privileged/*.py", "agent/kernel/*.py", "agent/engine/machine.py")


def say(text: str) -> None:
    print(text, flush=True)


def fail(text: str) -> NoReturn:
    sys.stderr.write(f"mutate: {text}\n")
    raise SystemExit(1)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.mutation",
                                description="Mutation testing of the root side (make mutate).")
    p.add_argument("--module", action="append", metavar="PATH",
                   help="a module or glob to mutate, relative to the tree (repeatable; "
                        f"default: {' '.join(DEFAULT_MODULES)})")
    p.add_argument("--id", action="append", metavar="ID",
                   help="only this mutant, judged again even if it was (repeatable)")
    p.add_argument("--sample", type=int, metavar="N",
                   help="only N mutants per module, evenly spaced through it")
    p.add_argument("-j", "--workers", type=int, default=2, metavar="N", help="default 2")
    p.add_argument("--state", default=os.path.join(TOP, ".mutation"), metavar="DIR",
                   help="results, coverage map and report (default .mutation/)")
    p.add_argument("--fresh", action="store_true", help="ignore earlier results")
    p.add_argument("--with-slow", action="store_true",
                   help="also run tests marked slow (the soak test: minutes per mutant)")
    p.add_argument("--run-uncovered", action="store_true",
                   help="run mutants on lines no test runs against their module's tests "
                        "(by default they survive without a run)")
    p.add_argument("--list", action="store_true", help="list the mutants and stop")
    p.add_argument("--report", action="store_true", help="print the report and stop")
    return p


def select_modules(patterns: list[str]) -> list[str]:
    found: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.join(TOP, pattern)))
        if not matches:
            fail(f"no module matches {pattern}")
        found += [os.path.relpath(p, TOP) for p in matches if p.endswith(".py")]
    return list(dict.fromkeys(found))


def all_mutants(modules: list[str], sample: int | None, ids: list[str] | None) -> list[Mutant]:
    out: list[Mutant] = []
    for module in modules:
        with open(os.path.join(TOP, module), "rb") as f:
            ms = mutants(module, f.read())
        if sample and len(ms) > sample:
            ms = [ms[i * len(ms) // sample] for i in range(sample)]
        out += ms
    if ids:
        wanted = set(ids)
        out = [m for m in out if m.id in wanted]
        missing = wanted - {m.id for m in out}
        if missing:
            fail(f"no such mutant: {sorted(missing)[0]}")
    return out


def spread(ms: list[Mutant]) -> list[Mutant]:
    """The order to run them in: modules in turn, and each module's mutants spread evenly
    through it (bit-reversed order), so that the report of a run cut short, or still
    going, is an even sample of every module."""
    by_module: dict[str, list[Mutant]] = {}
    for m in ms:
        by_module.setdefault(m.path, []).append(m)
    queues = []
    for group in by_module.values():
        bits = max(1, (len(group) - 1).bit_length())
        order = sorted(range(len(group)), key=lambda i: int(f"{i:0{bits}b}"[::-1], 2))
        queues.append([group[i] for i in order])
    out: list[Mutant] = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def commit() -> str:
    out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=TOP,
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # SIGTERM, and SIGINT even where a shell started us in the background with it ignored:
    # stop the mutants in flight and clean up, keeping what was judged.
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    args = parser().parse_args(argv)
    modules = select_modules(args.module or list(DEFAULT_MODULES))
    ms = all_mutants(modules, args.sample, args.id)
    try:
        equivalents = load_equivalents()
    except EquivalentListError as e:
        fail(str(e))
    everything = list(dict.fromkeys([*select_modules(list(DEFAULT_MODULES)), *modules]))
    stale = sorted(set(equivalents) - {m.id for m in mutants_of_all(everything)})
    if args.list:
        for m in ms:
            mark = "  (equivalent)" if m.id in equivalents else ""
            say(f"{m.path}:{m.line}  {m.kind}  {m.description}  [{m.id}]{mark}")
        say(f"{len(ms)} mutants in {len(modules)} modules")
        return 0
    os.makedirs(args.state, exist_ok=True)
    results = Results(os.path.join(args.state, "results.jsonl"), fresh=args.fresh)
    started = time.monotonic()
    tmap: CoverageMap | None = None
    if not args.report:
        tmap = run(args, modules, ms, equivalents, results)
    minutes = (time.monotonic() - started) / 60
    notes = [f"Tree {commit()}, {time.strftime('%Y-%m-%d %H:%M')}; "
             f"{len(ms)} mutants in {len(modules)} modules"
             + (f"; this run took {minutes:.0f} min with {args.workers} workers"
                if not args.report else "") + "."]
    if tmap is not None and tmap.broken:
        notes.append("Not run, failing on the unmutated copy: " + ", ".join(sorted(tmap.broken)))
    notes.append("Not run, by design: " + "; ".join(f"{t} ({why})" for t, why in
                                                    [*IGNORED_FILES.items(), *EXCLUDED.items()])
                 + ("" if args.with_slow else "; tests marked slow"))
    if stale:
        notes.append(f"{EQUIVALENT_FILE} names {len(stale)} mutant(s) that no longer exist: "
                     + ", ".join(stale))
    guarded = [r for r in results.latest.values() if r.get("guard")]
    if guarded:
        notes.append(f"The freeze guard refused a FIFREEZE or FITHAW for {len(guarded)} mutant(s), "
                     f"e.g. {guarded[0]['guard'][0]}")
    valid = current_results(results, everything)
    text = report.render(ms, valid, equivalents, notes)
    with open(os.path.join(args.state, "report.md"), "w", encoding="utf-8") as f:
        f.write(text)
    say("")
    say(text)
    say(f"(also in {os.path.join(args.state, 'report.md')})")
    if not (args.module or args.id):
        write_security_md(everything, valid, equivalents)
    return 0


def current_results(results: Results, modules: list[str]) -> dict[str, dict[str, Any]]:
    """The latest verdict of each mutant whose module is still as it was when judged."""
    hashes = {}
    for module in modules:
        with open(os.path.join(TOP, module), "rb") as f:
            hashes[module] = digest(f.read())
    return {i: r for i, r in results.latest.items()
            if r.get("path") in hashes and r.get("source_hash") == hashes[r["path"]]}


def write_security_md(modules: list[str], valid: dict[str, dict[str, Any]],
                      equivalents: dict[str, str]) -> None:
    """SECURITY.md's table: every mutant of the default modules, judged or not yet."""
    every = mutants_of_all(modules)
    judged = sum(1 for m in every if report.verdict_of(m, valid, equivalents) is not None)
    if report.complete(every, valid, equivalents):
        head = f"Tree {commit()}, {time.strftime('%Y-%m-%d')}: every mutant judged."
    else:
        head = (f"Tree {commit()}, {time.strftime('%Y-%m-%d')}: {judged} of {len(every)} "
                "mutants judged so far; the kill rate is over those judged, \"not run\" "
                "counts the rest.")
    if report.update_section(os.path.join(TOP, "SECURITY.md"),
                             [head, "", *report.table(every, valid, equivalents)]):
        say("SECURITY.md: table rewritten")


def mutants_of_all(modules: list[str]) -> list[Mutant]:
    out: list[Mutant] = []
    for module in modules:
        with open(os.path.join(TOP, module), "rb") as f:
            out += mutants(module, f.read())
    return out


def run(args: argparse.Namespace, modules: list[str], ms: list[Mutant],
        equivalents: dict[str, str], results: Results) -> CoverageMap | None:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        fail("mutation runs need Linux and root (the tests freeze loop filesystems)")
    files = tree_files()
    digests = file_digests(TOP, files)
    contexts = context_hashes(digests, modules)
    sources = {}
    for module in modules:
        with open(os.path.join(TOP, module), "rb") as f:
            sources[module] = digest(f.read())
    jobs = [Job(m, sources[m.path], contexts[m.path]) for m in spread(ms)
            if m.id not in equivalents
            and (args.id or results.judged(m, sources[m.path], contexts[m.path]) is None)]
    say(f"{len(ms)} mutants, {len(ms) - len(jobs)} already judged or equivalent, "
        f"{len(jobs)} to run")
    if not jobs:
        return None
    base = tempfile.mkdtemp(prefix="hvm-", dir="/tmp")
    os.chmod(base, 0o755)  # noqa: S103 - the tests' other users reach their sockets below
    rcu = rcu_expedited()
    try:
        # All copies now: what the run measures is the tree as it was when it started.
        copies = []
        for i in range(max(1, args.workers)):
            copy = Copy(os.path.join(base, f"w{i}")).create(files, modules)
            check_copy(copy)
            copies.append(copy)
        # Traced: every default module whatever is mutated now, so that one map serves
        # runs of any of them.
        traced = list(dict.fromkeys([*select_modules(list(DEFAULT_MODULES)), *modules]))
        tmap = coverage_map(args, base, files, traced, digests=digests, plain=copies[0])
        say(f"running {len(jobs)} mutants with {len(copies)} workers in {base}")
        run_workers(copies, jobs, tmap, results, say)
        return tmap
    except RunError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; run it again to go on where it stopped")
    finally:
        shutil.rmtree(base, ignore_errors=True)
        restore_rcu_expedited(rcu)


def is_test_file(rel: str) -> bool:
    return rel.startswith("tests/test_") and rel.endswith(".py")


def coverage_map(args: argparse.Namespace, base: str, files: list[str], modules: list[str], *,
                 digests: dict[str, str], plain: Copy) -> CoverageMap:
    """The stored map, brought up to date: made again whole when anything but a test file
    changed since it was made; else only the test files added or changed are traced again
    (a test written to kill a survivor costs its own file's run, not the suite's)."""
    product = tree_hash({r: d for r, d in digests.items() if not is_test_file(r)})
    key = digest(f"{MAP_FORMAT} {product} {modules} {args.with_slow}".encode())
    tests = {r: d for r, d in digests.items() if is_test_file(r)}
    path = os.path.join(args.state, "coverage.json")
    tmap = CoverageMap.load(path, key)
    if tmap is None:
        tmap = coverage_run(base, files, modules, with_slow=args.with_slow, plain=plain,
                            say=say)
    else:
        stale = sorted(f for f in set(tests) | set(tmap.files)
                       if tmap.files.get(f) != tests.get(f) and f not in IGNORED_FILES)
        if stale:
            tmap.drop_files(stale)
            again = [f for f in stale if f in tests]
            if again:
                say(f"coverage map: {path}; {len(again)} test file(s) changed, tracing them")
                tmap.merge(coverage_run(base, files, modules, with_slow=args.with_slow,
                                        plain=plain, say=say, only=again))
        else:
            say(f"coverage map: {path} (made for this tree)")
    tmap.files = tests
    tmap.save(path, key)
    tmap.with_slow, tmap.run_uncovered = args.with_slow, args.run_uncovered
    return tmap


if __name__ == "__main__":
    raise SystemExit(main())
