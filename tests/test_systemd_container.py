"""The shipped unit, started by a real systemd (PID 1 of a container), checked from outside.

A minimal Debian (tests/container.py) boots under systemd-nspawn with a copy of this
tree in /root/hv-vss-agent.  Inside, the README's Linux steps install the agent
(`make install`, then `systemctl enable --now hv-vss-agent`), with two files put there
first, as an operator trying it on a simulator would:

- /etc/hv-vss-agent.toml: `[freeze] only` names the scratch filesystem this test made
  (an ext4 loop filesystem of the host's, bound at /mnt/scratch); nothing else can be
  frozen, and `make install` keeps an existing config;
- the drop-in etc/systemd/simulator.conf: the simulator's socket as the device, and
  ConditionVirtualization= reset (the container is not a Hyper-V guest).

The simulator runs here, in the test, on a socket bound into the container.  From the
host, the test then reads what systemd really applied to the agent's processes (/proc,
their seccomp filters through ptrace, a probe joining their cgroup), drives CHECK,
FREEZE and THAW and watches a writer on the scratch filesystem, kills the agent while
frozen and sees systemd restart it, and stops it while frozen.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import psutil
import pytest

from agent.simulator.server import Simulator
from privileged.sandbox import child_policy, is_simulator
from privileged.seccomp import compile_policy, native_arch
from tests import container as ct
from tests import seccomp_dump as sd
from tests.helpers import REPO, assert_blocked, assert_writable, wait_for
from tests.unit_file import directives

UNIT = "hv-vss-agent.service"
SCRATCH = "/mnt/scratch"
SIM_DIR = "/run/hv-vss-sim"
DEVICE = f"{SIM_DIR}/vss.sock"
# A stand-in for the VSS device node, for DeviceAllow= (the agent itself talks to the
# simulator): the numbers of the host's /dev/loop-control, a misc device like hv_vss.
VSS_NODE = "/dev/vmbus/hv_vss"
_rdev = os.stat("/dev/loop-control").st_rdev
VSS_STANDIN = f"{os.major(_rdev)} {os.minor(_rdev)}"
DROPIN = os.path.join(REPO, "etc", "systemd", "simulator.conf")
# The README's Linux steps, as the README spells them (checked below), run in the clone.
STEPS = ("make install", "systemctl enable --now hv-vss-agent")
REPORT = os.environ.get("HVVSS_CONTAINER_REPORT")  # where `make systemd-container` wants facts
CAP_BITS = {"CAP_DAC_READ_SEARCH": 2, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8,
            "CAP_SYS_CHROOT": 18, "CAP_SYS_ADMIN": 21}
# x86_64 syscall numbers, from the kernel's header (linux-libc-dev, which make deps installs).
UNISTD_64 = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"


def _syscall_numbers() -> dict[str, int]:
    with open(UNISTD_64, encoding="ascii") as f:
        return {m[1]: int(m[2]) for m in re.finditer(r"#define __NR_(\w+) (\d+)", f.read())}

PROT_WRITE, PROT_EXEC = 2, 4
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
SCHED_FIFO = 1
PER_LINUX32 = 0x0008


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def _mounts(pid: int) -> dict[str, tuple[set[str], set[str], str]]:
    """Mount point -> (mount options, superblock options, source root), the last one wins."""
    out = {}
    with open(f"/proc/{pid}/mountinfo", encoding="ascii") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, sfields = left.split(), right.split()
            out[fields[4]] = (set(fields[5].split(",")), set(sfields[2].split(",")), fields[3])
    return out


def _covering(mounts: dict[str, tuple[set[str], set[str], str]], path: str
              ) -> tuple[set[str], set[str], str]:
    """The mount `path` is on: the longest mount point above it."""
    best = max((m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")),
               key=len)
    return mounts[best]


def _show(c: ct.Container, *props: str) -> dict[str, str]:
    out = c.run(f"systemctl show {UNIT} -p {','.join(props)}").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _agent_pids(c: ct.Container) -> tuple[int, int]:
    """(parent, root child) as the host sees them."""
    main = int(_show(c, "MainPID")["MainPID"])
    assert main, c.run(f"journalctl -u {UNIT} --no-pager", check=False).stdout
    parent = c.host_pid(main)
    kids = [p for p in psutil.Process(parent).children() if p.uids().real == 0]
    assert len(kids) == 1, kids
    return parent, kids[0].pid


def _probe_in_cgroup(cgroup: str) -> dict[str, str]:
    """A process that joins the unit's cgroup, then opens devices and connects to IPv4."""
    code = r"""
import json, os, socket, sys
with open(sys.argv[1], "w") as f:
    f.write(str(os.getpid()))
out = {}
for dev in ("/dev/null", "/dev/loop-control", "/dev/kmsg"):
    try:
        os.close(os.open(dev, os.O_RDWR))
        out[dev] = "opened"
    except OSError as e:
        out[dev] = os.strerror(e.errno)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.sendto(b"x", ("127.0.0.1", 9))
    out["udp 127.0.0.1"] = "sent"
except OSError as e:
    out["udp 127.0.0.1"] = os.strerror(e.errno)
print(json.dumps(out))
"""
    done = subprocess.run(["/usr/bin/python3", "-I", "-c", code,
                           os.path.join(cgroup, "cgroup.procs")],
                          capture_output=True, text=True, check=True, timeout=30)
    return json.loads(done.stdout)


def _freeze(sim: Simulator, timeout: float = 30) -> None:
    """FREEZE, asked again while the child refuses it for its protection against FREEZE
    floods (the default config's; this test does not tune it)."""
    deadline = time.monotonic() + timeout
    while sim.request("freeze").status != 0:
        assert time.monotonic() < deadline, "FREEZE refused all along"
        time.sleep(1)


def _cycle(sim: Simulator, host_mount: str) -> None:
    assert sim.request("check").status == 0
    _freeze(sim)
    probe = assert_blocked(host_mount)
    assert sim.request("thaw").status == 0
    assert probe.done_within(5)


def _readme_linux_steps() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Install on Linux", 1)[1].split("\n## ", 1)[0]
    return section


def test_readme_spells_the_steps_this_test_runs():
    section = _readme_linux_steps()
    for step in STEPS:
        assert step in section, step
    assert "simulator.conf" in section


@pytest.mark.timeout(1800)
def test_the_unit_under_systemd_confines_the_agent_and_it_freezes(workdir, make_fs):
    missing = ct.missing_tools()
    if missing:
        pytest.fail(f"missing tools: install {' '.join(missing)} (make deps does)",
                    pytrace=False)
    facts: dict[str, object] = {}
    started = time.monotonic()
    scratch = make_fs("ext4", name="scratch")
    sim_dir = os.path.join(workdir, "sim")
    os.mkdir(sim_dir, 0o700)
    sim = Simulator(os.path.join(sim_dir, "vss.sock")).start()
    try:
        with ct.booted(workdir, {scratch.mountpoint: SCRATCH, sim_dir: SIM_DIR}) as c:
            _seed(c)
            c.boot()
            c.run(f"mkdir -p {os.path.dirname(VSS_NODE)} && mknod {VSS_NODE} c {VSS_STANDIN}")
            facts["boot_s"] = round(time.monotonic() - started, 1)
            ct.say(f"booted ({facts['boot_s']} s since the start); running the README's steps")
            t = time.monotonic()
            outputs = [c.run(f"cd /root/hv-vss-agent && {step}") for step in STEPS]
            facts["install_s"] = round(time.monotonic() - t, 1)
            assert "keeping /etc/hv-vss-agent.toml" in outputs[0].stdout + outputs[0].stderr
            assert "install check passed" in outputs[0].stdout
            try:
                sim.wait_registered(30)
                _check_confinement(c, sim, facts)
                _check_freezing(c, sim, scratch.mountpoint, facts)
            except BaseException:
                journal = c.run(f"journalctl -u {UNIT} --no-pager -o short-monotonic",
                                check=False)
                ct.say(f"the unit's journal:\n{journal.stdout}")
                raise
            facts["total_s"] = round(time.monotonic() - started, 1)
    finally:
        sim.stop()
        if REPORT:
            with open(REPORT, "w", encoding="utf-8") as f:
                json.dump(facts, f, indent=2)
    assert_writable(scratch.mountpoint)


def _seed(c: ct.Container) -> None:
    """The clone, the test's config and the simulator drop-in, as root-owned files."""
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build",
                                    ".*_cache", ".hypothesis", "out")
    shutil.copytree(REPO, c.path("/root/hv-vss-agent"), ignore=ignore, symlinks=True)
    os.makedirs(c.path(SCRATCH), exist_ok=True)
    with open(c.path("/etc/hv-vss-agent.toml"), "w", encoding="utf-8") as f:
        f.write(f'[freeze]\nonly = ["{SCRATCH}"]   # the test\'s scratch filesystem, nothing else\n'
                '[watchdog]\nmax_frozen_seconds = 30\n')
    os.chmod(c.path("/etc/hv-vss-agent.toml"), 0o644)
    dropin_dir = c.path(f"/etc/systemd/system/{UNIT}.d")
    os.makedirs(dropin_dir, mode=0o755)
    with open(DROPIN, encoding="utf-8") as f:
        text = f.read()
    assert DEVICE in text, "the drop-in names another socket than the test binds"
    with open(os.path.join(dropin_dir, "simulator.conf"), "w", encoding="utf-8") as f:
        f.write(text)


def _check_confinement(c: ct.Container, sim: Simulator, facts: dict[str, object]) -> None:
    show = _show(c, "ActiveState", "SubState", "FragmentPath", "DropInPaths", "User")
    assert show["ActiveState"] == "active", c.run(f"journalctl -u {UNIT} --no-pager").stdout
    assert show["FragmentPath"] == f"/usr/local/lib/systemd/system/{UNIT}"
    parent, child = _agent_pids(c)
    hvvss = c.run("getent passwd hvvss").stdout.split(":")
    uid, gid = int(hvvss[2]), int(hvvss[3])

    # Users: the parent is hvvss for real, effective, saved and filesystem ids; the child root.
    ps, cs = _status(parent), _status(child)
    assert ps["Uid"].split() == [str(uid)] * 4 and ps["Gid"].split() == [str(gid)] * 4
    assert ps["Groups"] == ""
    assert cs["Uid"].split() == ["0"] * 4
    facts["parent"] = f"uid {uid} (hvvss), gid {gid}, no supplementary groups"

    # Capabilities: the child's bounding set is within the unit's (the child may drop more
    # itself) and it can freeze; nothing ambient or inheritable; the parent holds none.
    unit_caps = directives()["CapabilityBoundingSet"][0].split()
    mask = sum(1 << CAP_BITS[name] for name in unit_caps)
    assert int(cs["CapBnd"], 16) & ~mask == 0, (cs["CapBnd"], unit_caps)
    # and the child itself keeps only what it needs, in every set
    kept = 1 << CAP_BITS["CAP_SYS_ADMIN"] | 1 << CAP_BITS["CAP_DAC_READ_SEARCH"]
    assert int(cs["CapBnd"], 16) == int(cs["CapEff"], 16) == int(cs["CapPrm"], 16) == kept
    for s in (ps, cs):
        assert int(s["CapAmb"], 16) == 0 and int(s["CapInh"], 16) == 0
    assert int(ps["CapEff"], 16) == 0 and int(ps["CapPrm"], 16) == 0
    facts["child_capabilities"] = (f"bounding {cs['CapBnd']}, effective {cs['CapEff']}; "
                                   f"the unit's: {' '.join(unit_caps)}")

    # NoNewPrivileges, and seccomp: systemd's filters below each process's own (the
    # child loads its own before its first request).
    assert sim.request("check").status == 0
    ps, cs = _status(parent), _status(child)
    for s in (ps, cs):
        assert s["NoNewPrivs"] == "1" and s["Seccomp"] == "2"
    facts["seccomp_filters"] = {"parent": int(ps["Seccomp_filters"]),
                                "child": int(cs["Seccomp_filters"])}
    _check_seccomp(child, sim.path, facts)

    # Namespaces: mount, network, IPC and UTS of the unit's own; pid and user the system's.
    ns = {n: {os.readlink(f"/proc/{p}/ns/{n}") for p in (parent, child)}
          for n in ("mnt", "net", "ipc", "uts", "pid", "user")}
    system_ns = {n: os.readlink(f"/proc/{c.leader}/ns/{n}") for n in ns}
    for n in ("mnt", "net", "ipc", "uts"):  # PrivateMounts/Network/IPC, ProtectHostname
        assert len(ns[n]) == 1 and ns[n] != {system_ns[n]}, n
    for n in ("pid", "user"):
        assert ns[n] == {system_ns[n]}, n
    with open(f"/proc/{child}/net/dev", encoding="ascii") as f:
        interfaces = {line.split(":")[0].strip() for line in f.readlines()[2:]}
    assert interfaces == {"lo"}  # PrivateNetwork

    # The file system as the unit shows it to both processes.
    m = _mounts(child)
    # (/run/host is systemd-nspawn's, for the container's own systemd; no real system has it.)
    writable = sorted(p for p, (opts, _, _) in m.items() if "rw" in opts
                      and not p.startswith(("/dev", "/proc", "/tmp", "/var/tmp", "/run/host/")))
    # ProtectSystem=strict: everything read-only but the RuntimeDirectory and the sockets'
    # directory (and /dev, /proc, the private /tmp); the scratch filesystem too, a view
    # FIFREEZE does not mind.
    assert writable == ["/run/hv-vss-agent", "/run/hv-vss-agent-sockets"], writable
    for path in ("/", "/usr", "/etc", "/var", SCRATCH, "/home", "/root", "/run/user"):
        assert "ro" in _covering(m, path)[0], path  # ProtectHome=read-only too
    for tmp in ("/tmp", "/var/tmp"):
        assert "/systemd-private-" in m[tmp][2], m[tmp]  # PrivateTmp
    assert {"hidepid=invisible", "subset=pid"} <= m["/proc"][1]  # ProtectProc, ProcSubset
    for path in ("/sys", "/sys/fs/cgroup"):
        assert "ro" in _covering(m, path)[0], path  # ProtectKernelTunables, ...ControlGroups
    view = f"/proc/{child}/root"  # the file system as the child sees it
    proc = os.listdir(f"{view}/proc")  # ProcSubset=pid: no /proc/sys, nothing but processes
    assert proc and all(e.isdigit() or e in ("self", "thread-self") for e in proc), proc
    # (The parent shares this mount namespace, checked above, but from its chroot sees none.)
    state = os.stat(f"{view}/run/hv-vss-agent")
    assert (state.st_uid, state.st_mode & 0o777) == (0, 0o700)
    # OOMScoreAdjust=-900 needs CAP_SYS_RESOURCE, which systemd-nspawn cannot give the
    # container where the host's own bounding set lacks it (as on the test machine); then
    # systemd says so in the journal and starts the unit anyway.
    adj = set()
    for p in (parent, child):
        with open(f"/proc/{p}/oom_score_adj", encoding="ascii") as f:
            adj.add(f.read().strip())
    if int(_status(c.leader)["CapBnd"], 16) >> 24 & 1:
        assert adj == {"-900"}, adj
        facts["oom_score_adj"] = "-900"
    else:
        assert adj == {"0"}, adj
        facts["oom_score_adj"] = "0: the host's bounding set lacks CAP_SYS_RESOURCE"

    # DevicePolicy=closed, DeviceAllow= and IPAddressDeny=any are BPF programs on the unit's
    # cgroup: a probe that joins it may open /dev/null and the stand-in for the VSS device
    # (the numbers of /dev/loop-control), no other device, and sends no IPv4.
    probe = _probe_in_cgroup(_unit_cgroup(parent))
    assert probe == {"/dev/null": "opened", "/dev/loop-control": "opened",
                     "/dev/kmsg": "Operation not permitted",
                     "udp 127.0.0.1": "Operation not permitted"}, probe
    facts["cgroup_probe"] = probe

    # systemd's own score of the loaded unit, and the offline score SECURITY.md records.
    out = c.run(f"systemd-analyze security --no-pager {UNIT}").stdout
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d)", out)
    assert score, out
    with open(os.path.join(REPO, "SECURITY.md"), encoding="utf-8") as f:
        recorded = re.search(r"exposure level \*\*(\d+\.\d)\*\*", f.read())
    assert recorded and score.group(1) == recorded.group(1), (score.group(1), recorded)
    facts["systemd_analyze_security"] = score.group(1)
    facts["systemd"] = c.run("systemctl --version").stdout.splitlines()[0]


def _unit_cgroup(pid: int) -> str:
    """The directory of `pid`'s cgroup (the unit's) on the host's unified hierarchy."""
    with open(f"/proc/{pid}/cgroup", encoding="ascii") as f:
        cgroup = f.read().strip().split("::", 1)[1]
    assert cgroup.endswith(f"/system.slice/{UNIT}"), cgroup
    with open("/proc/self/mountinfo", encoding="ascii") as f:
        lines = f.readlines()
    for line in lines:
        left, _, right = line.partition(" - ")
        if right.split()[0] == "cgroup2":
            path = left.split()[4] + cgroup
            if os.path.isdir(path):
                return path
    raise AssertionError(f"no cgroup2 directory for {cgroup}")


def _check_seccomp(child: int, sim_socket: str, facts: dict[str, object]) -> None:
    """The child's filters, read with ptrace: systemd's first, then its own."""
    filters = sd.filters_of(child)
    # The child picks its filter by what --device names (the same socket, seen from here)
    # and by whether Landlock confines it (the unit allows the Landlock calls).
    own = {landlock: compile_policy(child_policy(simulated=is_simulator(sim_socket),
                                                 landlock=landlock), native_arch())
           for landlock in (True, False)}
    assert filters[-1] in own.values(), "the child's newest filter is not one it compiles"
    facts["child_landlock"] = filters[-1] == own[True]
    assert facts["child_landlock"], "the child did not confine itself with Landlock"
    systemd = filters[:-1]
    nr_of = _syscall_numbers()
    assert systemd, "no filter from systemd"
    eperm = sd.RET_ERRNO | errno.EPERM

    def decide(name: str, *args: int, arch: int = sd.AUDIT_ARCH_X86_64, nr: int | None = None
               ) -> int:
        return sd.decide(systemd, nr_of[name] if nr is None else nr, args, arch)

    verdicts = {
        # SystemCallFilter=@system-service chroot seccomp, SystemCallErrorNumber=EPERM
        "mount": decide("mount") == eperm,
        "init_module": decide("init_module") == eperm,  # ProtectKernelModules
        "chroot": decide("chroot") == sd.RET_ALLOW,
        "seccomp": decide("seccomp") == sd.RET_ALLOW,
        "ioctl": decide("ioctl") == sd.RET_ALLOW,
        "syncfs": decide("syncfs") == sd.RET_ALLOW,
        "syslog": decide("syslog") & sd.ACTION == sd.RET_ERRNO,  # ProtectKernelLogs
        "clock_settime": decide("clock_settime") & sd.ACTION == sd.RET_ERRNO,  # ProtectClock
        "sethostname": decide("sethostname") & sd.ACTION == sd.RET_ERRNO,  # ProtectHostname
        # RestrictAddressFamilies=AF_UNIX
        "socket(AF_UNIX)": decide("socket", socket.AF_UNIX) == sd.RET_ALLOW,
        "socket(AF_INET)": decide("socket", socket.AF_INET) & sd.ACTION == sd.RET_ERRNO,
        "socket(AF_NETLINK)": decide("socket", socket.AF_NETLINK) & sd.ACTION == sd.RET_ERRNO,
        # MemoryDenyWriteExecute
        "mmap(W|X)": decide("mmap", 0, 4096, PROT_WRITE | PROT_EXEC) & sd.ACTION == sd.RET_ERRNO,
        "mprotect(X)": decide("mprotect", 0, 4096, PROT_EXEC) & sd.ACTION == sd.RET_ERRNO,
        "mmap(R)": decide("mmap", 0, 4096, 1) == sd.RET_ALLOW,
        # RestrictNamespaces
        "unshare(NEWUSER)": decide("unshare", CLONE_NEWUSER) & sd.ACTION == sd.RET_ERRNO,
        "unshare(NEWNS)": decide("unshare", CLONE_NEWNS) & sd.ACTION == sd.RET_ERRNO,
        "setns": decide("setns", 3, CLONE_NEWNET) & sd.ACTION == sd.RET_ERRNO,
        # LockPersonality, RestrictRealtime, RestrictSUIDSGID
        "personality(LINUX32)": decide("personality", PER_LINUX32) & sd.ACTION == sd.RET_ERRNO,
        "sched_setscheduler(FIFO)": decide("sched_setscheduler", 0, SCHED_FIFO) & sd.ACTION
        == sd.RET_ERRNO,
        "fchmodat(setuid)": decide("fchmodat", 0, 0, 0o4755) & sd.ACTION == sd.RET_ERRNO,
        "fchmodat(0755)": decide("fchmodat", 0, 0, 0o755) == sd.RET_ALLOW,
        # SystemCallArchitectures=native: neither x32 nor i386
        "x32 getpid": decide("getpid", nr=sd.X32_SYSCALL_BIT | nr_of["getpid"]) != sd.RET_ALLOW,
        "i386 getpid": decide("getpid", nr=20, arch=sd.AUDIT_ARCH_I386) != sd.RET_ALLOW,
    }
    assert all(verdicts.values()), {k: v for k, v in verdicts.items() if not v}
    # A refusal by systemd's filters is never a kill (a killed child would leave a freeze).
    for name in ("mount", "socket", "mmap", "unshare", "personality", "kexec_load"):
        assert decide(name, 2, 4096, 7, 0x10000000) & sd.ACTION != sd.RET_KILL_PROCESS, name
    facts["seccomp_systemd"] = {
        "filters": len(systemd),
        "mount": sd.describe(decide("mount")),
        "socket(AF_INET)": sd.describe(decide("socket", socket.AF_INET)),
        "mmap(W|X)": sd.describe(decide("mmap", 0, 4096, PROT_WRITE | PROT_EXEC)),
        "unshare(NEWUSER)": sd.describe(decide("unshare", CLONE_NEWUSER)),
        "i386 getpid": sd.describe(decide("getpid", nr=20, arch=sd.AUDIT_ARCH_I386)),
        "x32 getpid": sd.describe(decide("getpid", nr=sd.X32_SYSCALL_BIT | nr_of["getpid"])),
    }


def _check_freezing(c: ct.Container, sim: Simulator, host_mount: str,
                    facts: dict[str, object]) -> None:
    # CHECK, FREEZE, THAW: a writer on the scratch filesystem blocks while it is frozen.
    _cycle(sim, host_mount)
    _cycle(sim, host_mount)
    facts["cycles"] = "CHECK/FREEZE/THAW twice: writer blocked while frozen, done after THAW"

    # SIGKILL of the parent while frozen: the child thaws on EOF, systemd restarts the pair.
    # The device node is gone by then: systemd resolves DeviceAllow='s path when the unit
    # starts, so a node that appears later stays refused until the next start.
    c.run(f"rm {VSS_NODE}")
    _freeze(sim)
    probe = assert_blocked(host_mount)
    parent, _ = _agent_pids(c)
    os.kill(parent, signal.SIGKILL)
    assert probe.done_within(5), "still frozen after the parent was killed"
    t = time.monotonic()
    assert wait_for(lambda: sim.connections >= 2, timeout=30), "systemd did not restart it"
    facts["restart_after_sigkill_s"] = round(time.monotonic() - t, 1)
    sim.wait_registered(30, connections=2)
    _cycle(sim, host_mount)
    c.run(f"mknod {VSS_NODE} c {VSS_STANDIN}")
    parent, _ = _agent_pids(c)
    probe = _probe_in_cgroup(_unit_cgroup(parent))
    assert probe["/dev/loop-control"] == "Operation not permitted", probe
    facts["device_node_missing_at_start"] = "refused for the unit's whole run: " + str(probe)

    # systemctl stop while frozen (KillMode=mixed: SIGTERM to the parent only): thawed,
    # and the unit stops cleanly.
    _freeze(sim)
    probe = assert_blocked(host_mount)
    c.run(f"systemctl stop {UNIT}")
    assert probe.done_within(5), "still frozen after systemctl stop"
    show = _show(c, "ActiveState", "Result", "NRestarts")
    assert show["ActiveState"] == "inactive" and show["Result"] == "success", show
    facts["stop_while_frozen"] = "thawed; unit inactive, result success"
    # What systemd itself said while setting the unit up (its executor's own lines).
    journal = c.run(f"journalctl -u {UNIT} --no-pager -o cat", check=False).stdout
    facts["systemd_notes"] = sorted({line for line in journal.splitlines()
                                     if "ignoring" in line or "Failed" in line})

