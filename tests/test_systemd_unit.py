"""etc/systemd/hv-vss-agent.service: hardened, and the child can still freeze under it.

These tests need no systemd: tests/test_systemd_container.py starts the unit under
systemd as PID 1 of a container.  Here, what can be reproduced without it is
reproduced for real around the real agent: the unit's
CapabilityBoundingSet and NoNewPrivileges (setpriv), ProtectSystem=strict's
read-only view of every mount with a writable state directory (a private
mount namespace), PrivateNetwork (a network namespace) and
MemoryDenyWriteExecute (PR_SET_MDWE, which the kernel keeps across exec).
The SystemCallFilter is checked against a measurement in
tests/test_measured_syscalls.py; the exposure score is systemd's own.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import subprocess

from agent.engine.metrics import FILENAME
from tests.helpers import PY, REPO, Agent, assert_blocked, assert_writable, wait_for
from tests.unit_file import UNIT, directives

PR_SET_MDWE, MDWE_REFUSE_EXEC_GAIN = 65, 1


def test_exposure_is_the_one_security_md_records():
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", UNIT],
                         capture_output=True, text=True, check=False).stdout
    score = re.search(r"Overall exposure level for hv-vss-agent\.service: (\d+\.\d)", out)
    assert score, out
    with open(os.path.join(REPO, "SECURITY.md"), encoding="utf-8") as f:
        recorded = re.search(r"exposure level \*\*(\d+\.\d)\*\*", f.read())
    assert recorded, "SECURITY.md does not record the exposure level"
    assert score.group(1) == recorded.group(1)


def test_every_option_the_issue_asks_for_is_set():
    unit = directives()
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["ProtectHome"] == ["read-only"]  # not "yes": /home mounts must stay freezable
    for key in ("PrivateTmp", "PrivateNetwork", "NoNewPrivileges", "ProtectKernelModules",
                "ProtectKernelTunables", "RestrictNamespaces", "MemoryDenyWriteExecute",
                "LockPersonality", "RestrictSUIDSGID", "RestrictRealtime", "ProtectClock",
                "ProtectControlGroups", "ProtectKernelLogs", "ProtectHostname"):
        assert unit[key] == ["yes"], key
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert unit["DeviceAllow"] == ["/dev/vmbus/hv_vss rw"] and unit["DevicePolicy"] == ["closed"]
    assert unit["SystemCallArchitectures"] == ["native"]
    assert unit["SystemCallErrorNumber"] == ["EPERM"]  # a refusal, never a kill of the child
    assert unit["Restart"] == ["on-failure"]
    assert unit["RuntimeDirectoryPreserve"] == ["yes"]  # the crash record survives a restart


def _confined_python(workdir: str, writable: list[str], readonly: list[str]) -> str:
    """A stand-in for the interpreter that applies what the unit would, then execs it."""
    caps = directives()["CapabilityBoundingSet"][0].split()
    bounding = ",".join(["-all", *("+" + c.removeprefix("CAP_").lower() for c in caps)])
    mdwe = (f"import ctypes, os, sys; ctypes.CDLL(None).prctl({PR_SET_MDWE}, "
            f"{MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0 or sys.exit('no MDWE'); "
            f"os.execv({PY!r}, [{PY!r}] + sys.argv[1:])")
    # ProtectProc=invisible and ProcSubset=pid: a /proc of processes only (no /proc/sys)
    lines = ["set -e", "mount --make-rprivate /",
             "mount -t proc -o subset=pid,hidepid=invisible proc /proc"]
    lines += [f"mount --bind {shlex.quote(p)} {shlex.quote(p)}" for p in writable]
    lines += [f"mount -o remount,bind,ro {shlex.quote(p)}" for p in readonly]
    lines.append(f'exec setpriv --bounding-set={bounding} --inh-caps=-all --no-new-privs '
                 f'{shlex.quote(PY)} -c {shlex.quote(mdwe)} "$@"')
    wrapper = os.path.join(workdir, "as-the-unit")
    with open(wrapper, "w", encoding="utf-8") as f:
        f.write("#!/bin/sh\n# ProtectSystem=strict + RuntimeDirectory, then exec as the unit\n"
                f"exec unshare --mount --net sh -c {shlex.quote(chr(10).join(lines))} sh "
                '"$@"\n')
    os.chmod(wrapper, 0o755)
    return wrapper


def test_the_child_freezes_under_the_unit_s_restrictions(workdir, ext4_xfs):
    mounts = [fs.mountpoint for fs in ext4_xfs]
    state = os.path.join(workdir, "state")
    os.mkdir(state, 0o700)
    run = os.path.join(workdir, "run")  # RuntimeDirectory-like: sockets and metrics
    os.makedirs(os.path.join(run, "metrics"), 0o755)
    os.chown(os.path.join(run, "metrics"), pwd.getpwnam("hvvss").pw_uid, -1)
    agent = Agent(workdir, mounts, notify={"socket": os.path.join(run, "notify.sock")},
                  control={"socket": os.path.join(run, "control.sock")},
                  metrics={"dir": os.path.join(run, "metrics")})
    agent.python = _confined_python(workdir, writable=[state, run], readonly=["/", *mounts])
    try:
        agent.start()
        child, parent = agent.child, agent.parent
        with open(f"/proc/{child.pid}/status", encoding="ascii") as f:
            status = dict(line.split(":", 1) for line in f)
        # from the unit's set (SYS_ADMIN 21, DAC_READ_SEARCH 2, SETGID 6, SETUID 7,
        # SYS_CHROOT 18, SETPCAP 8) the child keeps the first two, in every set
        assert int(status["CapBnd"], 16) == int(status["CapEff"], 16) == 1 << 21 | 1 << 2
        assert os.readlink(f"/proc/{child.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        with open(f"/proc/{child.pid}/mountinfo", encoding="ascii") as f:
            views = {line.split()[4]: line.split()[5] for line in f}
        assert all(views[m].startswith("ro") for m in mounts)  # as ProtectSystem shows them
        assert agent.sim.request("check").status == 0
        assert agent.sim.request("freeze").status == 0
        probes = [assert_blocked(m) for m in mounts]
        assert agent.sim.request("thaw").status == 0
        for p in probes:
            assert p.done_within(5)
        assert parent.uids().real != 0
        assert len(parent.children()) == 2  # the root child and the frontend
        assert wait_for(lambda: os.path.exists(os.path.join(run, "metrics", FILENAME)))
    finally:
        agent.stop()
    for m in mounts:
        assert_writable(m)
