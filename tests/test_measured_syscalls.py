"""The allowlists against what the real agent does (strace -f; tools/measure_syscalls.py).

One measurement per run, shared by the tests below: the real agent on a
scratch filesystem, driven by the simulator through cycles, the watchdog,
REOPEN, SIGSTOP, signals, syslog going away and both ways of stopping.
"""

from __future__ import annotations

import os

import pytest

from agent.sandbox_linux import FRONTEND, ROLES, parent_policy
from privileged.sandbox import child_policy
from privileged.syscall_table import SYSCALLS
from tests.unit_file import syscall_filter
from tools.measure_syscalls import Trace, measure, report


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> Trace:
    from tests.conftest import _require_root

    _require_root()
    work = tmp_path_factory.mktemp("measure")
    os.chmod(work, 0o755)
    return measure(str(work))


@pytest.mark.root
def test_every_syscall_made_once_sandboxed_is_allowed(trace):
    lines = report(trace)
    assert lines[-1] == "every syscall made is allowed", "\n".join(lines)
    # and the measurement saw the work of each role, not an idle process
    assert {"ioctl", "syncfs", "recvmsg", "restart_syscall"} <= set(trace.calls["child"])
    assert {"recvfrom", "sendto", "wait4", "restart_syscall"} <= \
        set(trace.calls["parent[service]"])
    assert {"futex", "openat", "renameat", "fchmod"} <= \
        set(trace.calls["parent[service+frontend+metrics]"])
    assert {"accept4", "getsockopt", "rseq"} <= set(trace.calls["frontend"])


@pytest.mark.root
def test_the_unit_allows_every_syscall_the_agent_makes(trace):
    """systemd's SystemCallFilter applies from exec on: start-up included."""
    assert sorted(trace.everything - syscall_filter()) == []


def test_the_unit_allows_everything_our_own_filters_allow():
    ours = (child_policy(simulated=True, landlock=True).allowed() | FRONTEND.allowed()
            | parent_policy(tuple(ROLES)).allowed())
    assert sorted((ours & set(SYSCALLS["x86_64"])) - syscall_filter()) == []
