"""How many lines of our code run as root (SECURITY.md quotes this output).

    python -m tools.root_loc

Two sets, found by importing rather than by guessing:
- the root child: every privileged/ module a fresh `python -I -B -S`
  interpreter has loaded once privileged.child is imported, as the child
  starts (privileged/freeze_memory.py is refused to root; freeze_freebsd is
  not loaded on Linux);
- the parent before its drop: every agent/ and privileged/ module the real
  agent, started as root with every root-side feature configured, opens
  before its first setresuid() (tools/parent_trace.py, under strace; needs
  root).
A code line is one that is not blank, not only a comment and not part of a
docstring.  The standard library the child imports runs as root too; it is
counted separately, as modules.
"""

from __future__ import annotations

import ast
import io
import json
import os
import subprocess
import sys
import tokenize

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_LOADED = """
import json, sys
sys.path.insert(0, {top!r})
import {module}
print(json.dumps(sorted((n, m.__file__) for n, m in sys.modules.items()
                        if getattr(m, "__file__", None))))
"""


def loaded(module: str, flags: tuple[str, ...]) -> list[tuple[str, str]]:
    out = subprocess.run([sys.executable, *flags, "-c", _LOADED.format(top=TOP, module=module)],
                         capture_output=True, text=True, check=True, cwd="/").stdout
    return [(name, path) for name, path in json.loads(out)]


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


def main() -> int:
    child_modules = loaded("privileged.child", ("-I", "-B", "-S"))
    child = ours(child_modules, "privileged")
    from tools.parent_trace import trace

    parent = trace().modules  # the real agent under strace, up to its setresuid()
    stdlib = [n for n, p in child_modules if not p.startswith(TOP)]
    for title, table in (("root child", child), ("parent before the drop", parent)):
        print(f"{title}: {sum(table.values())} code lines in {len(table)} files")
        for path, n in sorted(table.items()):
            print(f"  {n:5}  {path}")
    both = child | parent
    print(f"either: {sum(both.values())} code lines in {len(both)} files")
    print(f"root child, standard library: {len(stdlib)} modules besides ours")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
