"""`make demo` by an ordinary user in their own clone: the demo without root.

README says that without root the demo runs an in-memory freezer and says so.  Run for
real: a clone owned by an unprivileged account, the real Makefile as that account (its
own virtualenv, from the python3 on its PATH), the agent and its child started without
root, sandboxed as they always are.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.test_sudo_clone import ENV, OWNER, clone_owned_by, roots_files


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_make_demo_without_root_runs_the_in_memory_demo(workdir):
    os.chmod(workdir, 0o755)  # the account must reach its clone
    clone = clone_owned_by(OWNER, workdir)
    demo = subprocess.run(["setpriv", f"--reuid={OWNER}", f"--regid={OWNER}", "--init-groups",
                           "make", "demo"], cwd=clone, env={**ENV, "HOME": clone},
                          capture_output=True, text=True, timeout=540, check=False)
    out = demo.stdout + demo.stderr
    assert demo.returncode == 0, out[-3000:]
    assert "not root: skipping system packages" in out
    assert "NOT ROOT: using an in-memory freezer" in out
    assert "OK: 3 cycle(s); every reply as expected" in out, out
    assert roots_files(clone) == []
