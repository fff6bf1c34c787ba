"""SECURITY.md stays true: every test it names exists, and its figures are today's."""

from __future__ import annotations

import ast
import os
import re
import subprocess

import pytest

from tests.helpers import PY, REPO

with open(os.path.join(REPO, "SECURITY.md"), encoding="utf-8") as _f:
    TEXT = _f.read()


def test_every_test_named_in_security_md_exists():
    named = set(re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", TEXT))
    assert len(named) > 50
    missing = []
    for path, name in sorted(named):
        with open(os.path.join(REPO, path), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        if name not in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}:
            missing.append(f"{path}::{name}")
    assert missing == []


@pytest.mark.timeout(600)  # the parent is started and traced under strace
def test_root_lines_of_code_are_the_ones_the_tool_counts():
    out = subprocess.run([PY, "-m", "tools.root_loc", "--no-rss"], capture_output=True,
                         text=True, cwd=REPO, check=True).stdout
    counts = dict(re.findall(r"^(root child on Linux|root child on FreeBSD|parent before the "
                             r"drop): (\d+) code lines", out, re.MULTILINE))
    modules = re.search(r"root child: standard-library modules: (\d+)", out)
    words = (r"the root child runs \*\*(\d+)\*\* code lines on Linux and \*\*(\d+)\*\* on "
             r"FreeBSD .*? \*\*(\d+)\*\* standard-library modules .*? the parent runs \*\*(\d+)"
             r"\*\* code lines")
    stated = re.search(words.replace(" ", r"\s+"), TEXT, re.DOTALL)
    assert stated, "SECURITY.md does not state the counts"
    assert modules
    assert stated.groups() == (counts["root child on Linux"], counts["root child on FreeBSD"],
                               modules.group(1), counts["parent before the drop"])


def test_measured_syscall_table_names_only_what_the_filters_allow():
    """The table of measured syscalls cannot claim a call the filter would kill."""
    from agent.sandbox_linux import FRONTEND, parent_policy
    from privileged.sandbox import child_policy

    rows = dict(re.findall(r"^\| ([^|]+) \| `([a-z_0-9 ]+)`", TEXT, re.MULTILINE))
    policies = {"root child (simulator: REOPEN connects)":
                    child_policy(simulated=True, landlock=True),
                "frontend": FRONTEND,
                "parent, `service`": parent_policy(("service",)),
                "parent, `service` + `frontend` + `metrics`":
                    parent_policy(("service", "frontend", "metrics"))}
    assert set(policies) <= set(rows)
    for role, policy in policies.items():
        assert set(rows[role].split()) <= set(policy.names()), role
