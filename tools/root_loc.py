"""What runs as root, counted (SECURITY.md quotes this output); exits 1 if a figure is
over what is held.

    python -m tools.root_loc [--no-rss] [--figures] [--goals]

--no-rss leaves out the child's memory (it starts the real child), --figures
prints the figures alone, --goals (or ROOT_LOC_GOALS=1) holds the child's code
lines to the goal rather than to today's count (the parent's are held to their
goal always); exit status 1 when a figure is over what is held.  Needs root and strace (the
parent is traced).

Found by importing rather than by guessing, each set in a fresh interpreter:
- the root child on Linux: every module a `python -I -B -S` interpreter has
  loaded once privileged.child is imported.  The child imports at its top
  level everything it will run (its platform's modules included, chosen by
  privileged/system.py, never later); tests/test_root_loc.py checks that the
  real child, having served CHECK, FREEZE, THAW and QUIT, has loaded nothing
  more.  privileged/freeze_memory.py (the demo's, refused to root) is not
  loaded;
- the root child on FreeBSD: the same import with sys.platform set to
  "freebsd14.0" before privileged/ is loaded, so that the child's own
  platform test picks FreeBSD's modules (none of them calls FreeBSD at
  import);
- the parent before its drop: every agent/ and privileged/ module the real
  agent, started as the unit starts it with every root-side feature
  configured, opens before its first setresuid(), under strace
  (tools/parent_trace.py); and the third-party and .pth files it opens and
  the threads it starts, which must be none.
A code line is one that is not blank, not only a comment and not part of a
docstring.  The standard library the child loads runs as root too: counted
as modules, every entry of sys.modules that has a file (source, frozen or
extension module) outside this tree, the interpreter's own start-up modules
included; modules built into the interpreter binary (sys, posix, _signal,
errno, time ...) have no file and are listed apart.  A module with a file
outside the standard library's directories is third-party.  The child's
memory is measured on the real child (Linux only): VmRSS and VmHWM from
/proc once it has said HELLO and answered CHECK (with a config that selects
nothing, in a temporary state directory), against a bare
`python -I -S -c <sleep>`.
"""

from __future__ import annotations

import ast
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
import tokenize

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The goals.  The child's code lines are held to today's count (it may only go down) until
#: they reach the goal; --goals (or ROOT_LOC_GOALS=1) holds them to the goal itself.  The
#: parent's are within their goal, and held to it.
CHILD_LINES = 700  # on each platform
# The Linux parallel freeze and [freeze] rcu_expedited raised these from 1651 and 1420:
# about 145 lines for the freeze by dependency levels in worker threads (concurrent.py,
# freezer.py, selection.py, sandbox.py), about 90 for the rcu opt-in (rcu.py, statefile.py,
# child.py, child_config.py; Linux only, FreeBSD does not load rcu.py); 3 more for CHECK's
# reuse of the last parse of an unchanged mount table (freeze_linux.py); about 45 for a thaw
# guard forked once at start-up instead of at every FREEZE (freezer.py, child.py: a fork
# just before FIFREEZE made the kernel's grace periods in it 7 ms longer, and the child's
# filter now refuses every fork); 7 for logging a CHECK's verdict and the crash-only lines
# at INFO only when they differ from the last (child.py: the parent's write of each line,
# between one host request and the next, made CHECKs back to back 30% slower); 10 (4 on
# FreeBSD) for a presync only when there is dirty data to flush (freeze_linux.py and the
# other freezers: a syncfs with nothing to flush cost a one-filesystem FREEZE 2 ms); 2 for
# a thaw guard that keeps none of the child's other descriptors (freezer.py: it held the
# child's socket to the parent, the state files and rcu_expedited's, all writable); 2 for
# one platform test for the whole child (system.py), 2 on Linux for Landlock without
# CAP_SYS_ADMIN (landlock.py sets no_new_privs first: the demo's child without root failed),
# 11 fewer on FreeBSD for statfs_freebsd.py's constants that only the tests read.
CHILD_LINES_TODAY = {"linux": 1964, "freebsd": 1665}
CHILD_STDLIB_MODULES = 30
CHILD_RSS_KIB = 12 * 1024
PARENT_LINES = 1200

_LOADED = """
import sys
{platform}sys.path.insert(0, {top!r})
import {module}
print(repr(sorted((n, getattr(m, "__file__", None) or "") for n, m in sys.modules.items())))
"""  # repr, not json: nothing is imported to report what was


def loaded(module: str, flags: tuple[str, ...], platform: str | None = None
           ) -> list[tuple[str, str]]:
    """(name, file) of every module a fresh interpreter has once `module` is imported; file
    "" for a module built into the interpreter."""
    fake = f"sys.platform = {platform!r}\n" if platform else ""
    code = _LOADED.format(top=TOP, module=module, platform=fake)
    out = subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True,
                         check=True, cwd="/").stdout
    return [(name, path) for name, path in ast.literal_eval(out)]


def code_lines(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        source = f.read()
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                and isinstance(first.value.value, str):
            docstrings |= set(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                            tokenize.DEDENT, tokenize.ENDMARKER):
            lines |= set(range(tok.start[0], tok.end[0] + 1))
    return len(lines - docstrings)


def ours(modules: list[tuple[str, str]], package: str) -> dict[str, int]:
    return {os.path.relpath(path, TOP): code_lines(path) for name, path in modules
            if name == package or name.startswith(package + ".")}


def theirs(modules: list[tuple[str, str]]) -> tuple[list[str], list[str], list[str]]:
    """(standard-library modules with a file, built-in modules, third-party modules)."""
    stdlib_dirs = tuple({sysconfig.get_paths()[k] + os.sep for k in ("stdlib", "platstdlib")})
    with_file = [(n, p) for n, p in modules if p and not p.startswith(TOP + os.sep)]
    return ([n for n, p in with_file if p.startswith(stdlib_dirs)],
            [n for n, p in modules if not p and n != "__main__"],
            [n for n, p in with_file if not p.startswith(stdlib_dirs)])


def child_sets() -> dict[str, list[tuple[str, str]]]:
    """What the root child loads, per platform."""
    return {"linux": loaded("privileged.child", ("-I", "-B", "-S"), "linux"),
            "freebsd": loaded("privileged.child", ("-I", "-B", "-S"), "freebsd14.0")}


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "VmHWM")}


def bare_interpreter_memory() -> dict[str, int]:
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", "import time; time.sleep(3)"])
    try:
        time.sleep(1.0)
        return _status(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def child_memory() -> dict[str, int]:
    """The real root child (Linux), started as the agent starts it, once it has answered
    CHECK; its config selects nothing, so nothing is ever frozen."""
    with tempfile.TemporaryDirectory(prefix="root-loc-") as work:
        config = os.path.join(work, "child.toml")
        with open(os.open(config, os.O_WRONLY | os.O_CREAT, 0o600), "w", encoding="utf-8") as f:
            f.write(f'[freeze]\nonly = ["{work}/none"]\n[state]\ndir = "{work}/state"\n')
        ours_, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        boot = (f"import sys; sys.path.insert(0, {TOP!r}); "
                "from privileged.child import main; sys.exit(main())")
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-S", "-c", boot, "--fd", str(child_end.fileno()),
             "--ppid", str(os.getpid()), "--config", config], pass_fds=(child_end.fileno(),),
            env={}, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        child_end.close()
        try:
            ours_.settimeout(30)

            def next_record(kind: int) -> None:  # skipping LOG records
                while (record := ours_.recv(4096))[1] != kind:
                    if not record:
                        raise EOFError("the root child ended")

            next_record(0x83)  # HELLO
            ours_.send(struct.pack("<BBHI", 1, 1, 0, 1))  # CHECK
            next_record(0x81)
            memory = _status(proc.pid)
            ours_.send(struct.pack("<BBHI", 1, 5, 0, 2))  # QUIT
            next_record(0x81)
            proc.wait(30)
            return memory
        finally:
            ours_.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def parent_figures() -> tuple[dict[str, int], list[str], int, int] | None:
    """The parent's code run as root (ours, by file), the third-party files it opens, the
    .pth files and the threads, as strace sees the real agent (tools/parent_trace.py);
    None where it cannot be traced (not root, no strace)."""
    from tools.parent_trace import trace

    if os.geteuid() != 0 or shutil.which("strace") is None:
        return None
    seen = trace()
    return seen.modules, seen.third_party, len(seen.pth), seen.threads


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    goals = "--goals" in args or os.environ.get("ROOT_LOC_GOALS") == "1"
    sets = child_sets()
    child = {platform: ours(modules, "privileged") for platform, modules in sets.items()}
    traced = parent_figures()
    if traced is None:
        print("parent before the drop: not measured (it is traced: run as root, with strace)")
    parent, parent_third, parent_pth, parent_threads = traced or ({}, [], 0, 0)
    quiet = "--figures" in args
    tables = [("root child on Linux", child["linux"]), ("root child on FreeBSD", child["freebsd"])]
    for title, table in tables + ([("parent before the drop", parent)] if traced else []):
        print(f"{title}: {sum(table.values())} code lines in {len(table)} files")
        for path, n in sorted(table.items()) if not quiet else ():
            print(f"  {n:5}  {path}")
    for platform, modules in sets.items() if not quiet else ():
        stdlib, builtin, _ = theirs(modules)
        print(f"root child on {platform}: {len(stdlib)} standard-library modules, "
              f"{len(builtin)} built into the interpreter")
        print(f"  standard library: {' '.join(stdlib)}")
        print(f"  built in: {' '.join(builtin)}")
    # (figure, value, goal, limit enforced now)
    figures: list[tuple[str, int, int, int | None]] = []
    for platform, name in (("linux", "Linux"), ("freebsd", "FreeBSD")):
        lines = sum(child[platform].values())
        figures.append((f"root child on {name}: code lines", lines, CHILD_LINES,
                        CHILD_LINES if goals else CHILD_LINES_TODAY[platform]))
    stdlib_n = max(len(theirs(m)[0]) for m in sets.values())
    third = sorted({n for m in sets.values() for n in theirs(m)[2]})
    figures += [("root child: standard-library modules", stdlib_n, CHILD_STDLIB_MODULES,
                 CHILD_STDLIB_MODULES),
                ("root child: third-party modules", len(third), 0, 0)]
    if "--no-rss" not in args and sys.platform.startswith("linux"):
        child_kib, bare_kib = child_memory(), bare_interpreter_memory()
        print(f"root child memory: VmRSS {child_kib['VmRSS']} KiB; a bare interpreter: VmHWM "
              f"{bare_kib['VmHWM']} KiB")
        figures.append(("root child: VmHWM KiB", child_kib["VmHWM"], CHILD_RSS_KIB,
                        CHILD_RSS_KIB))
    if traced:
        figures += [("parent before the drop: code lines", sum(parent.values()), PARENT_LINES,
                     PARENT_LINES),
                    ("parent before the drop: third-party files", len(parent_third), 0, 0),
                    ("parent before the drop: .pth files", parent_pth, 0, 0),
                    ("parent before the drop: threads", parent_threads, 0, 0)]
    print("figures (goal; limit enforced now):")
    over = []
    for name, value, goal, limit in figures:
        print(f"  {name}: {value} ({goal}; {'not enforced' if limit is None else limit})")
        if limit is not None and value > limit:
            over.append(f"{name}: {value} > {limit}")
    if third or parent_third:
        print(f"third-party: child {third}, parent {parent_third}")
    if over:
        print(f"over the limits: {'; '.join(over)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
