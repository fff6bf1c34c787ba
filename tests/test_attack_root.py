"""Attacks on what root does, from outside: an unprivileged user, the real agent or the real
root child, real filesystems, racing and stalling them.

Each test is the attack a reviewer ran (or would run) against a claim of SECURITY.md:
- a user who owns a directory above a configured mountpoint swaps it for a symlink, to
  make root freeze (or, in crash recovery, thaw) another filesystem;
- one target's storage stalls while being frozen, to keep the others frozen past the
  watchdog;
- a user plants modules named like standard ones beside privileged/, to run code as root;
- a user swaps the device node REOPEN opens, to get an O_RDWR descriptor to a root file;
- a relative --config, a config reached through a symlink into a user's directory, a state
  directory or device in one;
- and code running inside the real child, under its real confinement, tries what a fully
  compromised child would.
Nothing here freezes anything but the scratch filesystems the test made.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from agent.dev.demo import Writer
from agent.engine import child_start
from agent.engine.child_link import ChildLink
from agent.kernel import linux_wire as lw
from privileged import wire
from privileged.child import REOPEN_BURST, REOPEN_EVERY
from privileged.freeze_linux import FIFREEZE, FITHAW
from privileged.hardening import CAP_DAC_READ_SEARCH, CAP_SYS_ADMIN
from privileged.landlock import abi as landlock_abi
from tests.helpers import (
    PY,
    REPO,
    USER_PY,
    Agent,
    assert_blocked,
    assert_writable,
    cli,
    running_agent,
    wait_for,
    write_config,
)

ATTACKER = pwd.getpwnam("nobody").pw_uid
RENAME_EXCHANGE = 2

# Runs as the attacker: swap two names in its own directory, atomically, until told to stop.
SWAPPER = """\
import ctypes, os, sys, time
a, b, stop, pause = sys.argv[1:5]
libc = ctypes.CDLL(None, use_errno=True)
n = 0
while not os.path.exists(stop):
    if libc.renameat2(-100, a.encode(), -100, b.encode(), 2) != 0:
        sys.exit("renameat2: " + os.strerror(ctypes.get_errno()))
    n += 1
    if float(pause):
        time.sleep(float(pause))
print(n)
"""


@contextlib.contextmanager
def swapping(workdir: str, a: str, b: str, pause: float = 0.0) -> Iterator[None]:
    """The attacker exchanges `a` and `b` over and over; both are back in place after."""
    stop = os.path.join(workdir, "stop-swapping")
    proc = subprocess.Popen([USER_PY, "-I", "-c", SWAPPER, a, b, stop, str(pause)],
                            user=ATTACKER, stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        time.sleep(0.1)
        assert proc.poll() is None, "the attacker's swapper did not start"
        yield
    finally:
        with open(stop, "w"):
            pass
        out, _ = proc.communicate(timeout=10)
        os.unlink(stop)
        assert proc.returncode == 0 and int(out) > 0, out
    if os.path.islink(a):  # an odd number of exchanges: put them back
        exchange(a, b)


def exchange(a: str, b: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, a.encode(), -100, b.encode(), RENAME_EXCHANGE) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")


def attacker_dir(workdir: str, name: str = "user") -> str:
    d = os.path.join(workdir, name)
    os.mkdir(d, 0o755)
    os.chown(d, ATTACKER, -1)
    return d


def writable_within(mountpoint: str, seconds: float, dir_fd: int | None = None) -> bool:
    """A write from another process completes within `seconds` (else it is left to finish).
    With `dir_fd`, an open descriptor of the mountpoint, the write goes through it, so no
    path is walked that an attacker could be swapping at the time."""
    probe = ("import os,sys; d = int(sys.argv[2]); "
             "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, "
             "dir_fd=d if d >= 0 else None); os.write(fd, b'x')")
    fds = () if dir_fd is None else (dir_fd,)
    target = os.path.join(mountpoint, "probe.dat") if dir_fd is None else "probe.dat"
    proc = subprocess.Popen([PY, "-I", "-c", probe, target,
                             str(-1 if dir_fd is None else dir_fd)], pass_fds=fds)
    try:
        proc.wait(seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def freeze_by_hand(mountpoint: str) -> None:
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
    finally:
        os.close(fd)


def thaw_by_hand(mountpoint: str) -> bool:
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FITHAW, 0)
        return True
    except OSError as e:
        assert e.errno == errno.EINVAL
        return False
    finally:
        os.close(fd)


def fs_key(mountpoint: str) -> str:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mountpoint:
                return fields[2]
    raise AssertionError(f"{mountpoint} is not mounted")


# --- root acts only on the filesystem it selected -----------------------------------------


@pytest.fixture
def swap_scene(workdir, make_fs):
    """X, configured, at USER/real/mnt in a directory the attacker owns; Y, the victim, at
    a root-owned place; USER/evil, the attacker's symlink to Y's directory."""
    user = attacker_dir(workdir)
    real, victim = os.path.join(user, "real"), os.path.join(workdir, "victim")
    for d in (real, victim):
        os.mkdir(d, 0o755)
    os.chown(real, ATTACKER, -1)
    x = make_fs("ext4", name="user/real/mnt")
    y = make_fs("ext4", name="victim/mnt")
    os.symlink(victim, os.path.join(user, "evil"))
    os.lchown(os.path.join(user, "evil"), ATTACKER, -1)
    return x, y, os.path.join(user, "real"), os.path.join(user, "evil")


def test_a_symlink_swapped_above_a_mountpoint_never_freezes_another_filesystem(workdir,
                                                                               swap_scene):
    x, y, real, evil = swap_scene
    froze_x = 0
    x_root = os.open(x.mountpoint, os.O_RDONLY | os.O_DIRECTORY)  # before any swap
    try:
        with running_agent(workdir, [x.mountpoint], frontend=False) as agent, \
                swapping(workdir, real, evil):
            for _ in range(30):
                ok = agent.sim.request("freeze").status == lw.HV_S_OK
                try:
                    assert writable_within(y.mountpoint, 2.0), \
                        f"{y.mountpoint} was frozen, through the attacker's symlink"
                    if ok:
                        froze_x += not writable_within(x.mountpoint, 0.2, x_root)
                finally:
                    agent.sim.request("thaw")
            log = agent.log()
    finally:
        os.close(x_root)
    assert froze_x > 0, "no FREEZE got through: the test raced nothing"
    assert "the path now leads to" in log or "open: " in log  # and some were refused
    assert_writable(x.mountpoint)


def test_the_path_is_checked_against_the_mount_table_after_it_is_opened(swap_scene):
    """The same exchange done once, between selection and open: what the open reaches is
    not the selected filesystem, and nothing is frozen."""
    from privileged.freeze_linux import LinuxFreezer
    from privileged.freezer import FreezeFailed

    x, y, real, _evil = swap_scene
    (target,) = [m for m in LinuxFreezer().mounts() if m.mountpoint == x.mountpoint]
    os.rename(real, real + ".moved")
    os.rename(os.path.dirname(y.mountpoint), real)  # no symlink: Y's directory, renamed in
    try:
        with pytest.raises(FreezeFailed, match="the path now leads to") as e:
            LinuxFreezer().open([target])
        assert e.value.errno == errno.EXDEV
    finally:
        os.rename(real, os.path.dirname(y.mountpoint))
        os.rename(real + ".moved", real)
    assert_writable(x.mountpoint)
    assert_writable(y.mountpoint)


def test_crash_recovery_never_thaws_what_a_swapped_path_leads_to(workdir, swap_scene):
    """A dead child's record names X; someone else holds Y frozen.  While the attacker
    swaps, the next children recover: Y stays frozen every time."""
    x, y, real, evil = swap_scene
    state = os.path.join(workdir, "state")
    config = write_config(os.path.join(workdir, "child.toml"), [x.mountpoint], workdir)
    record = f"{fs_key(x.mountpoint)} {x.mountpoint}\n"
    x_fd = os.open(x.mountpoint, os.O_RDONLY | os.O_DIRECTORY)  # X itself, whatever its path
    freeze_by_hand(y.mountpoint)  # someone else's freeze, not ours to touch
    try:
        with swapping(workdir, real, evil, pause=0.0005):
            for _ in range(8):
                with contextlib.suppress(OSError):
                    fcntl.ioctl(x_fd, FIFREEZE, 0)  # as the dead child left it
                os.makedirs(state, 0o700, exist_ok=True)
                with open(os.path.join(state, "frozen"), "w", encoding="utf-8") as f:
                    f.write(record)
                link = ChildLink.spawn(config, None)
                link.wait_hello()
                link.request(wire.Op.QUIT)
                assert link.exit_status(10) == 0
                assert not writable_within(y.mountpoint, 0.2), "Y was thawed by the recovery"
    finally:
        thaw_by_hand(y.mountpoint)
        with contextlib.suppress(OSError):
            fcntl.ioctl(x_fd, FITHAW, 0)
        os.close(x_fd)


# --- the watchdog is a bound, whatever blocks ---------------------------------------------


def stalled_freeze(agent: Agent, stalled: str, holder: str) -> tuple[threading.Thread,
                                                                     list[int]]:
    """Leave data for the freeze of `stalled` to write out, and freeze `holder`, where its
    image lives: the host's FREEZE, sent by the thread returned (not yet started), then
    blocks in FIFREEZE of `stalled` until `holder` is thawed.  `answer` gets its status."""
    with open(os.path.join(stalled, "dirty"), "wb") as f:
        f.write(os.urandom(1 << 20))
    freeze_by_hand(holder)
    answer: list[int] = []
    return threading.Thread(target=lambda: answer.append(
        agent.sim.request("freeze", timeout=60).status)), answer


def test_a_stalled_freeze_does_not_keep_the_others_frozen_past_the_watchdog(workdir, make_fs):
    """B's image lives on C; with C frozen, B's FIFREEZE blocks (its journal cannot reach
    its storage) for ten watchdog windows.  A, frozen before it, is thawed at the deadline:
    its writer's longest stall stays within max_frozen_seconds + 0.5 s."""
    max_frozen = 1.0
    c = make_fs("ext4", name="holder", size_mb=200)
    b = make_fs("ext4", name="stalled", backing_dir=c.mountpoint)
    a = make_fs("ext4", name="first")  # mounted last: frozen first (newest first)
    writer = Writer(os.path.join(a.mountpoint, "writer.dat")).start()
    with running_agent(workdir, [a.mountpoint, b.mountpoint], frontend=False, presync=False,
                       max_frozen=max_frozen, sim_timeouts={"util_timeout": 30.0}) as agent:
        t, answer = stalled_freeze(agent, b.mountpoint, c.mountpoint)
        try:
            t.start()
            time.sleep(10 * max_frozen)  # B's freeze blocks all this time
        finally:
            thaw_by_hand(c.mountpoint)
        t.join(60)
        assert answer == [lw.HV_E_FAIL]
        agent.sim.request("thaw")
        assert_writable(a.mountpoint)
        assert_writable(b.mountpoint)
        assert wait_for(lambda: f"FREEZE failed on {b.mountpoint} (frozen only after the "
                        "watchdog's deadline: its freeze blocked in the kernel)" in agent.log())
    writer.stop()
    gaps = [later - earlier for earlier, later in itertools.pairwise(writer.done)]
    assert max(gaps) > 0.5 * max_frozen, "A was never frozen: the test stalled nothing"
    assert max(gaps) <= max_frozen + 0.5, f"A stayed frozen {max(gaps):.1f} s"


# --- what root imports is what was checked ------------------------------------------------

PLANTED = ("enum", "socket", "select", "signal", "struct", "ctypes", "tomllib", "argparse",
           "logging", "dataclasses", "errno", "fnmatch", "resource", "array", "stat",
           "collections", "math", "types", "functools", "re")


def test_modules_planted_beside_privileged_never_run_as_root(workdir, make_fs):
    """A copy of the install (as a package manager lays it out), and user-owned modules
    named like standard ones in the directory holding privileged/: none of them runs, in
    the real child or the parent."""
    fs = make_fs("ext4")
    top = os.path.join(workdir, "install")
    for pkg in ("agent", "privileged"):
        shutil.copytree(os.path.join(REPO, pkg), os.path.join(top, pkg),
                        ignore=shutil.ignore_patterns("__pycache__"))
    os.chmod(top, 0o755)
    marker = os.path.join(workdir, "planted-ran")
    for name in PLANTED:
        path = os.path.join(top, f"{name}.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"open({marker!r}, 'a').write({name!r} + ' ran as uid %d\\n' % "
                    "__import__('os').getuid())\nraise ImportError('planted')\n")
        os.chown(path, ATTACKER, -1)
    agent = Agent(workdir, [fs.mountpoint], frontend=False)
    agent.argv_prefix = [PY, "-I", "-S", "-B", os.path.join(top, "agent", "__main__.py")]
    try:
        agent.start()
        assert agent.sim.request("freeze").status == lw.HV_S_OK
        probe = assert_blocked(fs.mountpoint, 0.2)
        agent.sim.request("thaw")
        assert probe.done_within(5)
        assert agent.child.cmdline()[1:4] == ["-I", "-B", "-S"]
    finally:
        agent.stop()
    assert not os.path.exists(marker), open(marker).read()


def test_the_child_s_sys_path_is_checked_even_where_it_names_nothing(monkeypatch, workdir):
    """A sys.path entry that does not exist (python311.zip) is refused if someone else
    could create it."""
    from agent.engine import integrity
    from agent.errors import StartupError

    user = attacker_dir(workdir, "lib")
    zipped = os.path.join(user, "python311.zip")
    real = integrity.child_sys_path()
    monkeypatch.setattr(integrity, "child_sys_path", lambda: [zipped, *real])
    with pytest.raises(StartupError, match=f"directory {user} is owned by uid {ATTACKER}"):
        integrity.check_install(None)
    monkeypatch.setattr(integrity, "child_sys_path", lambda: real)
    integrity.check_install(None)


@pytest.mark.parametrize("unsafe", ["owned", "group-writable"])
def test_a_sys_path_directory_of_the_child_is_judged_itself_not_only_what_it_holds(
        monkeypatch, workdir, unsafe):
    """An entry of the child's sys.path that is a directory someone else may change is
    refused, even when everything in it is root's: whoever owns it can add a module."""
    from agent.engine import integrity
    from agent.errors import StartupError

    if unsafe == "owned":
        lib = attacker_dir(workdir, "lib")
        says = f"{lib} is owned by uid {ATTACKER}, not root"
    else:
        lib = os.path.join(workdir, "lib")
        os.mkdir(lib)
        os.chmod(lib, 0o775)
        says = f"{lib} is writable by group or others (mode 0775)"
    with open(os.path.join(lib, "harmless.py"), "w", encoding="utf-8") as f:
        f.write("pass\n")  # root's, 0644: nothing below the directory is wrong
    real = integrity.child_sys_path()
    monkeypatch.setattr(integrity, "child_sys_path", lambda: [lib, *real])
    with pytest.raises(StartupError, match=re.escape(says)):
        integrity.check_install(None)


# --- REOPEN opens the device it recorded, nothing else -------------------------------------


def test_reopen_never_hands_out_anything_but_the_device(workdir, make_fs):
    """The device path lies in the attacker's directory; a compromised parent asks REOPEN
    as fast as it can while the attacker swaps the path among the real socket, a symlink to
    a character device and a symlink to a root-only file."""
    fs = make_fs("ext4")
    user = attacker_dir(workdir, "dev")
    device = os.path.join(user, "vss")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(device)
    server.listen(64)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                server.accept()[0].close()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    secret = os.path.join(workdir, "secret")
    with open(secret, "w", encoding="utf-8") as f:
        f.write("root only\n")
    os.chmod(secret, 0o600)
    for name, target in (("null", "/dev/null"), ("file", secret)):
        os.symlink(target, os.path.join(user, name))
        os.lchown(os.path.join(user, name), ATTACKER, -1)
    config = write_config(os.path.join(workdir, "child.toml"), [fs.mountpoint], workdir)
    link = ChildLink.spawn(config, device)
    link.wait_hello()
    given = refused = 0
    start = time.monotonic()
    try:
        with swapping(workdir, device, os.path.join(user, "null")), \
                swapping(workdir, device, os.path.join(user, "file")):
            for _ in range(3000):
                res, fds = link.request(wire.Op.REOPEN)
                for fd in fds:
                    st = os.fstat(fd)
                    try:
                        assert stat.S_ISSOCK(st.st_mode), f"REOPEN passed {oct(st.st_mode)}"
                        peer = socket.socket(fileno=os.dup(fd)).getpeername()
                        assert peer == device, peer
                    finally:
                        os.close(fd)
                    given += 1
                refused += res.status is wire.Status.REFUSED
        link.request(wire.Op.QUIT)
    finally:
        link.close()
        server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(): the thread ends
        server.close()
        acceptor.join(5)
    assert not acceptor.is_alive()
    assert given + refused > 0
    assert given <= REOPEN_BURST + (time.monotonic() - start) / REOPEN_EVERY + 1


# --- paths root reads or writes must be root's all the way up --------------------------------


def one_line(proc: subprocess.CompletedProcess[str], says: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
        proc.stderr
    assert says in proc.stderr, proc.stderr


def test_a_relative_config_is_the_same_file_for_parent_and_child(workdir, make_fs):
    fs = make_fs("ext4")
    agent = Agent(workdir, [fs.mountpoint], frontend=False)
    agent.config, agent.cwd = "agent.toml", workdir
    try:
        agent.start()
        assert agent.sim.request("freeze").status == lw.HV_S_OK
        probe = assert_blocked(fs.mountpoint, 0.3)
        agent.sim.request("thaw")
        assert probe.done_within(5)
    finally:
        agent.stop()


def test_a_config_reached_through_a_symlink_into_a_user_s_directory_is_refused(workdir):
    user = attacker_dir(workdir)
    real = write_config(os.path.join(user, "agent.toml"), [], workdir)  # root's, 0600
    link = os.path.join(workdir, "agent.toml")
    os.symlink(real, link)
    one_line(cli("-n", "--config", link, "--device", "/nonexistent"),
             f"refusing config file {link}: directory {user} is owned by uid {ATTACKER}")


def test_a_state_directory_in_a_user_s_directory_is_refused(workdir, make_fs):
    fs = make_fs("ext4")
    user = attacker_dir(workdir)
    agent = Agent(workdir, [fs.mountpoint], frontend=False,
                  extra="")
    with open(agent.config, encoding="utf-8") as f:
        text = f.read()
    with open(agent.config, "w", encoding="utf-8") as f:
        f.write(text.replace(os.path.join(workdir, "state"), os.path.join(user, "state")))
    agent.sim.start()
    agent.launch(wait=False)
    assert agent.wait_exit(30) == 1
    agent.stop()
    assert f"state directory {os.path.join(user, 'state')}: directory {user} is owned by " \
           f"uid {ATTACKER}" in agent.log()
    assert not os.path.exists(os.path.join(user, "state"))


def test_a_device_in_a_user_s_directory_is_refused(workdir):
    user = attacker_dir(workdir, "dev")
    config = write_config(os.path.join(workdir, "agent.toml"), [], workdir)
    one_line(cli("-n", "--config", config, "--device", os.path.join(user, "vss")),
             f"refusing the device {os.path.join(user, 'vss')}: directory {user} is owned by "
             f"uid {ATTACKER}")


# --- a fully compromised child ----------------------------------------------------------

# Run inside the real child, in place of its PING handler: after everything main() does.
ATTACK = """
import ctypes, errno, json, os, socket
from privileged import child as _child
def _attack(child, op, seq, _ping=_child.HANDLERS[_child.p.PING]):
    libc = ctypes.CDLL(None, use_errno=True)
    out = {}
    def attempt(name, fn):
        try:
            fn()
            out[name] = "allowed"
        except OSError as e:
            out[name] = errno.errorcode.get(e.errno, str(e.errno))
    def raw(name, rc):
        out[name] = "allowed" if rc >= 0 else errno.errorcode[ctypes.get_errno()]
    def opened(path, flags, mode=0o600):
        os.close(os.open(path, flags, mode))
    attempt("write core_pattern", lambda: opened("/proc/sys/kernel/core_pattern", os.O_WRONLY))
    attempt("read-write core_pattern",
            lambda: opened("/proc/sys/kernel/core_pattern", os.O_RDWR))
    attempt("append ld.so.preload", lambda: opened("/etc/ld.so.preload",
                                                  os.O_WRONLY | os.O_APPEND | os.O_CREAT))
    attempt("create outside the state directory",
            lambda: opened(OUTSIDE, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    attempt("create in the state directory",
            lambda: opened(STATE + "/planted", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    attempt("rename a state file", lambda: os.rename(STATE + "/frozen", STATE + "/moved"))
    attempt("connect", lambda: socket.socket(socket.AF_UNIX).connect(LISTENER))
    attempt("connect abstract", lambda: socket.socket(socket.AF_UNIX).connect(ABSTRACT))
    raw("ptrace", libc.ptrace(16, ctypes.c_long(TARGET), None, None))  # PTRACE_ATTACH
    raw("mount", libc.mount(b"none", MOUNT_ON.encode(), b"tmpfs", 0, None))
    raw("init_module", libc.syscall(175, None, 0, b""))
    raw("finit_module", libc.syscall(313, -1, b"", 0))
    # invalid flags: were these calls let through, they would fail (EINVAL), never act
    raw("kexec_load", libc.syscall(246, 0, 0, None, ctypes.c_ulong(0xDEAD0000)))
    raw("kexec_file_load", libc.syscall(320, -1, -1, 0, b"", ctypes.c_ulong(0xDEAD0000)))
    attempt("setuid", lambda: os.setuid(1))
    attempt("exec", lambda: os.execv("/bin/true", ["true"]))
    raw("make itself dumpable", libc.prctl(4, 1, 0, 0, 0))  # PR_SET_DUMPABLE
    with open("/proc/self/status") as f:
        status = {l.split(":")[0]: l.split()[1] for l in f if l.startswith(("Cap", "NoNew"))}
    out["caps"] = {k: v for k, v in status.items() if k.startswith("Cap")}
    out["no_new_privs"] = status["NoNewPrivs"]
    _child.log(_child.p.WARNING, "ATTACK " + json.dumps(out))
    _ping(child, op, seq)
_child.HANDLERS[_child.p.PING] = _attack
"""


@pytest.fixture
def compromised_child(workdir, make_fs, monkeypatch):
    """The real child, its PING handler replaced by ATTACK (run after full confinement)."""
    fs = make_fs("ext4")
    outside = os.path.join(workdir, "outside")
    mount_on = os.path.join(workdir, "mount-here")
    os.mkdir(mount_on)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(workdir, "listener.sock"))
    listener.listen(1)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind(f"\0hvvss-test-{os.getpid()}")  # outside the child's Landlock domain
    abstract.listen(1)
    target = subprocess.Popen(["sleep", "60"])
    preload_existed = os.path.exists("/etc/ld.so.preload")
    setup = (f"OUTSIDE, STATE, LISTENER, TARGET, MOUNT_ON = {outside!r}, "
             f"{os.path.join(workdir, 'state')!r}, "
             f"{os.path.join(workdir, 'listener.sock')!r}, {target.pid}, {mount_on!r}\n"
             f"ABSTRACT = {abstract.getsockname()!r}\n")

    def run(landlock: bool, device: str | None = None) -> dict[str, object]:
        then = setup + ATTACK + ("" if landlock else (
            "import privileged.landlock as _l; _l.abi = lambda: 0\n")) + \
            "sys.exit(_child.main())"
        monkeypatch.setattr(child_start, "child_bootstrap", lambda: real_bootstrap(then))
        config = write_config(os.path.join(workdir, "child.toml"), [fs.mountpoint], workdir)
        link = ChildLink.spawn(config, device)
        link.wait_hello()
        link.send(wire.Op.PING)
        found: dict[str, object] = {}
        while True:
            msg, _ = link.receive()
            if isinstance(msg, wire.Log) and msg.text.startswith("ATTACK "):
                found = json.loads(msg.text[len("ATTACK "):])
            if isinstance(msg, wire.Result):
                break
        link.request(wire.Op.QUIT)
        assert link.exit_status(10) == 0
        return found

    real_bootstrap = child_start.child_bootstrap
    try:
        yield run
    finally:
        abstract.close()
        target.kill()
        target.wait()
        listener.close()
        with contextlib.suppress(OSError):
            subprocess.run(["umount", mount_on], check=False, capture_output=True)
        if not preload_existed and os.path.exists("/etc/ld.so.preload"):
            os.unlink("/etc/ld.so.preload")
        assert not os.path.exists(outside)
        assert_writable(fs.mountpoint)


KEPT = f"{(1 << CAP_SYS_ADMIN) | (1 << CAP_DAC_READ_SEARCH):016x}"


@pytest.mark.parametrize("landlock", [True, False], ids=["landlock", "seccomp-only"])
def test_a_compromised_child_is_confined(compromised_child, landlock):
    out = compromised_child(landlock)
    allowed = sorted(k for k, v in out.items() if v == "allowed")
    assert allowed == [], f"allowed to a compromised child: {allowed}"
    for call in ("ptrace", "mount", "init_module", "finit_module", "kexec_load",
                 "kexec_file_load", "setuid", "exec", "connect", "create in the state directory",
                 "create outside the state directory", "rename a state file",
                 "append ld.so.preload"):
        assert out[call] == "EPERM", (call, out[call])
    # without Landlock, seccomp refuses any read-write open; with it, Landlock does
    assert out["read-write core_pattern"] == ("EACCES" if landlock else "EPERM")
    assert out["write core_pattern"] == "EPERM" and out["ptrace"] == "EPERM"
    assert (out["make itself dumpable"], out["no_new_privs"]) == ("EPERM", "1")
    assert out["caps"] == {"CapInh": "0" * 16, "CapPrm": KEPT, "CapEff": KEPT, "CapBnd": KEPT,
                           "CapAmb": "0" * 16}


def test_a_compromised_child_on_the_simulator_reaches_no_abstract_socket(compromised_child,
                                                                         workdir):
    """With the simulator as its device, the child's filter lets it make Unix sockets and
    connect (REOPEN connects to the simulator); Landlock's scope (ABI 6 and later) keeps it
    from every abstract socket made outside its domain, such as a session bus's."""
    device = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device.bind(os.path.join(workdir, "simulator.sock"))
    try:
        out = compromised_child(True, device.getsockname())
    finally:
        device.close()
    assert landlock_abi() >= 6  # the kernels this runs on; older ones are in Known limits
    assert out["connect abstract"] == "EPERM"


def test_signals_from_outside_still_thaw(workdir, make_fs):
    fs = make_fs("ext4")
    config = write_config(os.path.join(workdir, "child.toml"), [fs.mountpoint], workdir)
    link = ChildLink.spawn(config, None)
    link.wait_hello()
    assert link.request(wire.Op.FREEZE)[0].status is wire.Status.OK
    probe = assert_blocked(fs.mountpoint, 0.2)
    os.kill(link.pid, signal.SIGTERM)
    assert probe.done_within(5)
    assert link.exit_status(10) == 0
