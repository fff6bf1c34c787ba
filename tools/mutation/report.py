"""The table per module and the list of survivors.

SECURITY.md's table is rewritten by a complete run over the default modules,
between the two marker lines below, when SECURITY.md has them.

Kill rate = (killed + timed out) / (killed + timed out + survived): a mutant
that makes a test hang is caught, and equivalent mutants (equivalent.txt) are
not in it.  Mutants not judged yet (an interrupted run, --sample) are
counted as "not run" and are not in the rate either.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from tools.mutation.mutants import Mutant
from tools.mutation.results import EQUIVALENT, ERROR, KILLED, SURVIVED, TIMEOUT

BEGIN = "<!-- written by make mutate (tools/mutation/report.py): do not edit by hand -->"
END = "<!-- end of what make mutate writes -->"
COLUMNS = ("module", "mutants", "killed", "timed out", "survived", "equivalent", "not run",
           "kill rate")


def verdict_of(m: Mutant, results: Mapping[str, dict[str, Any]],
               equivalents: Mapping[str, str]) -> str | None:
    if m.id in equivalents:
        return EQUIVALENT
    r = results.get(m.id)
    return str(r["verdict"]) if r else None


def rate(c: Mapping[str, int]) -> float | None:
    caught = c.get(KILLED, 0) + c.get(TIMEOUT, 0)
    judged = caught + c.get(SURVIVED, 0)
    return caught / judged if judged else None


def table(mutants: Sequence[Mutant], results: Mapping[str, dict[str, Any]],
          equivalents: Mapping[str, str]) -> list[str]:
    """A Markdown table: one row per module, and a total."""
    per: dict[str, Counter[str]] = {}
    for m in mutants:
        c = per.setdefault(m.path, Counter())
        c["mutants"] += 1
        c[verdict_of(m, results, equivalents) or "not run"] += 1
    total: Counter[str] = Counter()
    for c in per.values():
        total.update(c)
    rows = [f"| {' | '.join(COLUMNS)} |", "|" + "|".join(["---"] + ["---:"] * 7) + "|"]
    for module, c in [*sorted(per.items()), ("total", total)]:
        r = rate(c)
        not_run = c["not run"] + c[ERROR]
        rows.append(f"| {module} | {c['mutants']} | {c[KILLED]} | {c[TIMEOUT]} | "
                    f"{c[SURVIVED]} | {c[EQUIVALENT]} | {not_run} | "
                    f"{'-' if r is None else f'{100 * r:.1f}%'} |")
    return rows


def survivors(mutants: Sequence[Mutant], results: Mapping[str, dict[str, Any]],
              equivalents: Mapping[str, str]) -> list[str]:
    """One line per survivor: where, what, its id (for equivalent.txt)."""
    out = []
    for m in sorted(mutants, key=lambda m: (m.path, m.line, m.id)):
        if verdict_of(m, results, equivalents) != SURVIVED:
            continue
        note = "" if results[m.id].get("covered", True) else "  (no test runs this line)"
        out.append(f"{m.path}:{m.line}  {m.kind}  {m.description}{note}  [{m.id}]")
    return out


def errors(mutants: Sequence[Mutant], results: Mapping[str, dict[str, Any]]) -> list[str]:
    return [f"{m.path}:{m.line}  {m.description}: {results[m.id].get('detail', '')}  [{m.id}]"
            for m in mutants if results.get(m.id, {}).get("verdict") == ERROR]


def render(mutants: Sequence[Mutant], results: Mapping[str, dict[str, Any]],
           equivalents: Mapping[str, str], notes: Sequence[str] = ()) -> str:
    lines = ["# Mutation run", "", *notes, "", *table(mutants, results, equivalents), ""]
    surv = survivors(mutants, results, equivalents)
    lines += [f"## Survivors ({len(surv)})", "", *(f"- {s}" for s in surv), ""]
    errs = errors(mutants, results)
    if errs:
        lines += [f"## Not judged: errors ({len(errs)})", "", *(f"- {e}" for e in errs), ""]
    return "\n".join(lines)


def complete(mutants: Sequence[Mutant], results: Mapping[str, dict[str, Any]],
             equivalents: Mapping[str, str]) -> bool:
    """Every mutant judged (none left to run, none in error)."""
    return all(verdict_of(m, results, equivalents) not in (None, ERROR) for m in mutants)


def update_section(path: str, lines: Sequence[str]) -> bool:
    """Replace what lies between BEGIN and END in the file at `path` with `lines`; False
    (and nothing written) if the file does not have both markers."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return False
    head = text[: start + len(BEGIN)]
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + "\n" + "\n".join(lines) + "\n" + text[end:])
    return True
