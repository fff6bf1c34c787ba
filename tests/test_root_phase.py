"""What the parent runs as root, seen from outside (strace): only its root phase.

The daemon is started as the unit starts it (python -I -S, the launcher by its
path) with every root-side feature configured; tools/parent_trace.py reads the
parent's system calls up to its setresuid().
"""

from __future__ import annotations

import pytest

from tests.helpers import PY
from tools import parent_trace, root_loc

pytestmark = pytest.mark.root

# Modules that serve, talk to clients or confine, and every codec (the child's records, the
# kernel's, the simulator's, the child's TOML reader): loaded only by the unprivileged account.
NEVER_AS_ROOT = ("agent/engine/service.py", "agent/engine/machine.py", "agent/engine/daemon.py",
                 "agent/mp_logging.py", "agent/frontend/main.py", "agent/sandbox.py",
                 "agent/engine/status.py", "agent/engine/metrics.py",
                 "agent/kernel/channel.py", "agent/clients/cli.py", "privileged/selection.py",
                 "agent/engine/child_link.py", "privileged/wire.py", "privileged/records.py",
                 "agent/kernel/transport.py", "agent/simulator/wire.py",
                 "privileged/toml_subset.py", "agent/engine/freeze_gate.py",
                 "agent/peercred.py", "agent/engine/chroot.py")


def test_the_parent_runs_only_its_root_phase_as_root():
    seen = parent_trace.trace()
    assert seen.dropped  # it did reach its setresuid()
    assert seen.pth == []  # site.py never ran: no .pth file was even opened
    assert seen.third_party == []
    assert seen.threads == 0
    assert "agent/engine/root.py" in seen.modules
    assert [m for m in NEVER_AS_ROOT if m in seen.modules] == []
    assert seen.lines <= root_loc.PARENT_LINES, seen.modules


def test_the_trace_sees_what_site_py_would_run():
    """The same trace, with the interpreter started as `python -I -m agent` (site.py on):
    the .pth files of site-packages are opened as root, and the trace says so."""
    seen = parent_trace.trace(launch=(PY, "-I", "-m", "agent"))
    assert seen.pth, seen
