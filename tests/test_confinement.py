"""Confinement of both processes, checked from outside: psutil and /proc.

The real agent runs against the simulator on scratch filesystems; these
tests read what the kernel says about its two processes, and what the
kernel logged about them (a refused syscall is an audit record, type 1326,
because both filters are loaded with SECCOMP_FILTER_FLAG_LOG).
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import signal
import subprocess
import textwrap

import psutil
import pytest

from agent.engine.child_link import ChildLink
from privileged import hardening, wire
from privileged.syscall_table import SYSCALLS
from tests.helpers import (
    PY,
    REPO,
    Subscriber,
    assert_blocked,
    child_conversation_modules,
    descriptors,
    running_agent,
    status,
    wait_for,
    write_config,
)

O_CLOEXEC = 0o2000000


CAP_SYS_CHROOT = 18


def core_limit(pid: int) -> list[str]:
    with open(f"/proc/{pid}/limits", encoding="ascii") as f:
        line = next(x for x in f if x.startswith("Max core file size"))
    return line.split()[4:6]


def seccomp_records(pids: set[int], answered: tuple[str, ...] = ()) -> list[str]:
    """Audit records of refused or killed syscalls for `pids`, from the kernel log, but
    for the syscalls named in `answered` (a Refuse rule: an errno the caller copes with)."""
    log = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout
    expected = {f"syscall={SYSCALLS['x86_64'][name]} " for name in answered}
    return [line for line in log.splitlines() if "type=1326" in line
            and int(re.search(r" pid=(\d+)", line).group(1)) in pids  # type: ignore[union-attr]
            and not any(e in line and "sig=0" in line for e in expected)]


def _same_for_parent_and_frontend(pid: int, chroot: str) -> None:
    hvvss = pwd.getpwnam("hvvss")
    proc = psutil.Process(pid)
    assert tuple(proc.uids()) == (hvvss.pw_uid,) * 3
    assert tuple(proc.gids()) == (hvvss.pw_gid,) * 3
    st = status(pid)
    assert st["Groups"] == ""
    assert (st["NoNewPrivs"], st["Seccomp"], st["Seccomp_filters"]) == ("1", "2", "1")
    assert int(st["CapPrm"], 16) == int(st["CapEff"], 16) == 0  # no capability left
    # ... in any of its threads (capabilities are per thread: a thread started before
    # the last one was dropped would keep it), and none to be had again
    for task in os.listdir(f"/proc/{pid}/task"):
        t = status(f"{pid}/task/{task}")
        assert int(t["CapPrm"], 16) == int(t["CapEff"], 16) == int(t["CapInh"], 16) == 0, task
        assert int(t["CapBnd"], 16) & ~(1 << CAP_SYS_CHROOT) == 0, t["CapBnd"]
    assert os.readlink(f"/proc/{pid}/root") == chroot
    assert os.readlink(f"/proc/{pid}/cwd") == chroot
    assert os.listdir(f"/proc/{pid}/root/") == []  # all it can see: nothing
    assert core_limit(pid) == ["0", "0"]
    # not dumpable: its /proc files belong to root, not to hvvss, so another process
    # of that uid cannot ptrace it or read its memory
    assert os.stat(f"/proc/{pid}/fd").st_uid == 0


def kinds(pid: int) -> list[str]:
    """What each descriptor above stdio is: socket, pipe, or a path."""
    return sorted(re.sub(r":\[\d+\]", "", target)
                  for fd, (target, _) in descriptors(pid).items() if fd > 2)


def test_parent_seen_from_outside(workdir, ext4_xfs):
    with running_agent(workdir, [ext4_xfs[0].mountpoint], frontend=False) as agent:
        parent = agent.parent
        _same_for_parent_and_frontend(parent.pid, os.path.join(workdir, "empty"))
        # no file or directory held open: the kernel channel, the child, the signal pipe
        # (made just after registering with the kernel, which is what the test waited for)
        assert wait_for(lambda: kinds(parent.pid) == ["pipe", "pipe", "socket", "socket"]), \
            kinds(parent.pid)
        assert agent.sim.request("freeze").status == 0
        assert agent.sim.request("thaw").status == 0
        assert seccomp_records({parent.pid}) == []


def test_parent_and_frontend_seen_from_outside(workdir, ext4_xfs):
    """With [notify], [control] and [metrics]: two unprivileged processes, each confined.

    Each is looked at once it is known to be in the state described: the engine does not
    wait for the frontend to confine itself (the frontend closes what it inherited and
    loads its filter before it serves, so a welcomed subscriber is the sign), and the
    frontend sees a subscriber hang up when its loop next runs (so the subscriber's
    connection is a fourth socket until then: seen here with the frontend stopped)."""
    metrics = os.path.join(workdir, "metrics")
    os.mkdir(metrics, 0o755)
    os.chown(metrics, pwd.getpwnam("hvvss").pw_uid, -1)
    with running_agent(workdir, [ext4_xfs[0].mountpoint], metrics={"dir": metrics}) as agent:
        parent = agent.parent
        frontend = agent.frontend
        chroot = os.path.join(workdir, "empty")
        sub = Subscriber(agent.notify_socket, workdir)
        try:
            assert "welcome WELCOME" in sub.wait_welcome()
            for pid in (parent.pid, frontend.pid):
                _same_for_parent_and_frontend(pid, chroot)
            assert frontend.num_threads() <= 2  # itself, and the log queue's feeder
            for op in ("check", "freeze", "thaw"):
                assert agent.sim.request(op).status == 0
            assert wait_for(lambda: sub.events() == ["CHECK", "FREEZE", "THAW"])
            os.kill(frontend.pid, signal.SIGSTOP)
            try:
                sub.stop()
                # the link, notify, control, and the subscriber's connection: the
                # frontend has not run since the subscriber went
                assert kinds(frontend.pid).count("socket") == 4
            finally:
                os.kill(frontend.pid, signal.SIGCONT)
        finally:
            sub.stop()
        # Its connection is closed once the frontend has seen it hang up: not before.
        assert wait_for(lambda: "subscriber sub (uid 0" in agent.log()
                        and ") disconnected" in agent.log())
        assert wait_for(lambda: kinds(frontend.pid).count("socket") == 3), kinds(frontend.pid)
        # the parent: sockets, pipes, and the one directory outside its chroot it was
        # given, the metrics directory; the frontend: sockets and its log queue's pipe
        assert set(kinds(parent.pid)) == {"pipe", "socket", metrics}
        assert kinds(parent.pid).count(metrics) == 1
        assert set(kinds(frontend.pid)) == {"pipe", "socket"}
        # clone3 is answered ENOSYS on purpose: glibc starts the feeder thread with clone
        assert seccomp_records({parent.pid, frontend.pid}, answered=("clone3",)) == []


def test_child_seen_from_outside(workdir, ext4_xfs):
    mounts = sorted(fs.mountpoint for fs in ext4_xfs)
    with running_agent(workdir, mounts, frontend=False) as agent:
        child = agent.child
        assert tuple(child.uids()) == (0, 0, 0)
        st = status(child.pid)
        assert (st["NoNewPrivs"], st["Seccomp"], st["Seccomp_filters"]) == ("1", "2", "1")
        assert st["Umask"] == "0077"
        # CAP_SYS_ADMIN and CAP_DAC_READ_SEARCH, and nothing it could ever get back
        kept = f"{1 << 21 | 1 << 2:016x}"
        assert [st[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")] == \
            ["0" * 16, kept, kept, kept, "0" * 16]
        assert child.cmdline()[1:4] == ["-I", "-B", "-S"]
        # this kernel has Landlock (ABI 7): the child says so, rather than warn of its absence
        assert re.search(r"INFO: .*confined: Landlock ABI \d+ and seccomp", agent.log()), \
            agent.log()
        assert os.readlink(f"/proc/{child.pid}/cwd") == "/"
        with open(f"/proc/{child.pid}/environ", "rb") as f:
            assert f.read() == b""
        assert core_limit(child.pid) == ["0", "0"]

        def held(pid: int = child.pid) -> list[str]:
            fds = descriptors(pid)
            assert all(flags & O_CLOEXEC for _, flags in fds.values()), fds
            return sorted(re.sub(r":\[\d+\]", "", target) for target, _ in fds.values())

        # its socket to the parent, its socket to the thaw guard, and the two state files
        # it opened at start-up (all it may write)
        state = [os.path.join(workdir, "state", name) for name in ("budget", "frozen")]
        assert child.num_threads() == 1
        assert held() == sorted(["socket", "socket", *state])
        # the thaw guard: forked before the child confined itself, confined the same way
        # by itself, and holding its end of their socketpair alone, and no target between
        # FREEZEs
        (guard,) = child.children()
        assert wait_for(lambda: status(guard.pid)["Seccomp"] == "2")
        gst = status(guard.pid)
        assert (gst["NoNewPrivs"], gst["Seccomp"], gst["Seccomp_filters"]) == ("1", "2", "1")
        assert [gst[k] for k in ("CapPrm", "CapEff", "CapBnd")] == [kept, kept, kept]
        assert guard.num_threads() == 1
        assert held(guard.pid) == ["socket"]
        assert agent.sim.request("freeze").status == 0
        assert child.num_threads() == 1
        assert held() == sorted(["socket", "socket", *state, *mounts])
        assert held(guard.pid) == ["socket"]  # disarmed
        assert agent.sim.request("thaw").status == 0
        assert held() == sorted(["socket", "socket", *state])
        assert child.children() == [guard]  # the same guard, for the child's life
        # two targets: FREEZE ran worker threads, whose clone3 is answered ENOSYS (glibc then
        # calls clone); nothing else was refused
        assert seccomp_records({child.pid}, answered=("clone3",)) == []


def test_the_thaw_guard_keeps_none_of_the_child_s_other_descriptors(workdir, make_fs):
    """Not the child's socket to the parent, not its state files, not (opted in)
    /sys/kernel/rcu_expedited: the guard needs none of them to thaw, and with them it could
    write the crash record, a global kernel setting, or records to the parent."""
    fs = make_fs("ext4")
    with running_agent(workdir, [fs.mountpoint], rcu_expedited=True) as agent:
        child = agent.child
        (guard,) = child.children()
        assert wait_for(lambda: status(guard.pid)["Seccomp"] == "2")
        theirs = {target for target, _ in descriptors(child.pid).values()}
        assert "/sys/kernel/rcu_expedited" in theirs
        assert os.path.join(workdir, "state", "frozen") in theirs
        # one socket, and not one the child holds (the child's socket to the parent would
        # be): its own end of their socketpair, through which the child still arms it
        (link,) = (target for target, _ in descriptors(guard.pid).values())
        assert link.startswith("socket:") and link not in theirs
        assert agent.sim.request("freeze").status == 0
        assert agent.sim.request("thaw").status == 0
        assert child.children() == [guard]


def test_child_is_not_dumpable(workdir, make_fs):
    """Seen from outside, on the real child: a process of the same uid (root) holding the
    child's capabilities but not CAP_SYS_PTRACE cannot read its memory (ptrace_may_access
    refuses a process that is not dumpable; were it dumpable, the same uid would do)."""
    fs = make_fs("ext4")
    config = write_config(os.path.join(workdir, "child.toml"), [fs.mountpoint], workdir)
    link = ChildLink.spawn(config, None)
    link.wait_hello()
    # the control: a dumpable root process with the child's two capabilities
    control = subprocess.Popen(["setpriv", "--bounding-set=-all,+sys_admin,+dac_read_search",
                                "sleep", "30"])

    def probe(pid: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-all", PY, "-I", "-c",
             f"open('/proc/{pid}/mem', 'rb')"],
            capture_output=True, text=True, timeout=30, check=False)

    try:
        assert wait_for(lambda: psutil.Process(control.pid).name() == "sleep")
        assert probe(control.pid).returncode == 0, probe(control.pid).stderr
        refused = probe(link.pid)
        assert refused.returncode == 1 and "PermissionError" in refused.stderr, refused.stderr
    finally:
        control.kill()
        control.wait()
        link.request(wire.Op.QUIT)
        link.exit_status(10)


def test_parent_cannot_open_a_file_outside_its_chroot(workdir):
    """The drop and the sandbox as the daemon does them, then try to escape (and to
    become root again).

    Two layers: the chroot alone turns the path into nothing (ENOENT), and the
    seccomp filter refuses open() outright (EACCES)."""
    secret = write_config(os.path.join(workdir, "outside.toml"), [], workdir)
    code = textwrap.dedent(f"""\
        import errno, os, sys
        sys.path.insert(0, {REPO!r})
        from agent import sandbox
        from agent.engine import chroot, privdrop
        r, w = os.pipe()
        chroot.drop(privdrop.lookup_account("hvvss"), {os.path.join(workdir, "empty")!r})
        def attempt(path):
            try:
                os.close(os.open(path, os.O_RDONLY))
                return "opened"
            except OSError as e:
                return errno.errorcode[e.errno]
        paths = [{secret!r}, "/etc/passwd", "../../../../etc/passwd", "/proc/1/root/etc/passwd"]
        print(*[attempt(p) for p in paths])
        for regain in (os.setuid, os.setgid, os.seteuid):
            try:
                regain(0)
                print("regained root")
            except PermissionError:
                pass
        sandbox.confine_parent(w)
        print(*[attempt(p) for p in paths])
        """)
    out = subprocess.run([PY, "-I", "-c", code], capture_output=True, text=True, timeout=30,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["ENOENT ENOENT ENOENT ENOENT",
                                       "EACCES EACCES EACCES EACCES"]


def test_child_still_thaws_at_once_on_a_signal_without_a_wakeup_pipe(workdir, ext4_xfs):
    """The signal pipe is gone (one descriptor only): the loop's tick sees the flag."""
    mounts = [fs.mountpoint for fs in ext4_xfs]
    with running_agent(workdir, mounts, max_frozen=60, frontend=False) as agent:
        assert agent.sim.request("freeze").status == 0
        probes = [assert_blocked(m, 0.3) for m in mounts]
        child = agent.child
        child.send_signal(signal.SIGTERM)
        for p in probes:
            assert p.done_within(2), "not thawed within two seconds of SIGTERM"
        assert agent.wait_exit(5) == 3  # the parent saw its child go, and exits for a restart
        assert "exit status 0" in agent.log()  # the child's status, as its parent reaped it
        assert "automatic THAW of 2 filesystem(s) (signal)" in agent.log()


# (threading is there: logging imports it; test_child_seen_from_outside counts threads)
FORBIDDEN = ("pickle", "_pickle", "multiprocessing", "multiprocessing_logging", "psutil",
             "agent")


def test_child_never_loads_pickle_multiprocessing_psutil_or_agent(workdir, make_fs,
                                                                   monkeypatch):
    """The real child, a whole conversation; at its exit it writes the names of every
    module it had loaded."""
    _, modules = child_conversation_modules(workdir, make_fs("ext4").mountpoint, monkeypatch)
    assert "privileged.child" in modules and "ctypes" in modules
    assert [m for m in modules if m.split(".")[0] in FORBIDDEN] == []


def test_a_bounding_set_the_kernel_will_not_show_is_an_error_not_an_empty_one(monkeypatch):
    """PR_CAPBSET_READ ends the list with EINVAL past the last capability; any other error
    ends the child's start-up, rather than leave it every capability it was started with."""
    dropped: list[int] = []

    def prctl(option: int, arg: int, *rest: int) -> int:
        if option == hardening.PR_CAPBSET_READ:
            raise OSError(errno.EPERM, "refused by the test")
        dropped.append(arg)
        return 0

    monkeypatch.setattr(hardening, "_prctl", prctl)
    with pytest.raises(OSError) as refused:
        hardening.keep_only()
    assert refused.value.errno == errno.EPERM and dropped == []
