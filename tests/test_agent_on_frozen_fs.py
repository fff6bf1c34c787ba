"""The agent's own files on a filesystem it freezes: no deadlock, cycle after cycle.

A virtualenv with the agent installed (a copy, not an editable link), the
working directory and the debug log all live on one of the scratch
filesystems the agent freezes.  Any write there while frozen (a log line, a
.pyc, an import that writes) would block the process that must answer THAW.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.helpers import REPO, Agent, assert_writable, wait_for

CYCLES = 20


def test_agent_installed_on_a_filesystem_it_freezes(workdir, make_fs):
    home = make_fs("ext4", "home", size_mb=512)
    other = make_fs("xfs", "data")
    venv = os.path.join(home.mountpoint, "venv")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    source = os.path.join(workdir, "source")  # pip builds in the tree: not in ours
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"))
    subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", source],
                   check=True, timeout=600, capture_output=True)
    cwd = os.path.join(home.mountpoint, "work")
    os.mkdir(cwd)

    agent = Agent(workdir, [home.mountpoint, other.mountpoint],
                  log_path=os.path.join(home.mountpoint, "agent.log"))
    agent.python, agent.cwd = os.path.join(venv, "bin", "python"), cwd
    try:
        agent.start()
        child_cmd = agent.child.cmdline()
        assert child_cmd[0].startswith(venv)  # the root child runs from the frozen disk too
        for i in range(CYCLES):
            for op in ("check", "freeze", "thaw"):
                req = agent.sim.request(op, timeout=20)
                assert req.status == 0, f"cycle {i}: {op} answered {req.status:#x}"
        # the child logs THAWED just after it answers: the last line may trail the reply
        assert wait_for(lambda: agent.log().count("THAWED 2 filesystem(s)") == CYCLES)
        for fs in (home, other):
            assert_writable(fs.mountpoint)
    finally:
        agent.stop()
