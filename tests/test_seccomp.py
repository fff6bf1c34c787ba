"""The seccomp filters: numbers, compilation, and what the kernel then allows.

Compiled programs are run through tests/bpf.py (a BPF interpreter) against
a reference reading of the Policy; then the real filters are loaded in
throw-away processes and real syscalls are tried, allowed and refused.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.sandbox_linux import FIONBIO, FRONTEND, METRICS_OPEN, ROLES, parent_policy
from privileged import libc, seccomp
from privileged.freeze_linux import FIFREEZE, FITHAW
from privileged.sandbox import child_policy, is_simulator
from privileged.seccomp import (
    ALLOW,
    KILL_PROCESS,
    Allow,
    AllowIf,
    AllowIfClear,
    Policy,
    refuse_with,
)
from privileged.syscall_table import AUDIT_ARCH, SECCOMP_NR, SYSCALLS
from tests import bpf
from tests.helpers import PY, REPO, assert_writable

X86_HEADER = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"
GENERIC_HEADER = "/usr/include/asm-generic/unistd.h"
SIGSYS = 31
ALL_ROLES = tuple(ROLES)
CHILD = child_policy(simulated=False, landlock=True)  # with a device node, under Landlock
CHILD_NO_LANDLOCK = child_policy(simulated=False, landlock=False)
CHILD_SIMULATED = child_policy(simulated=True, landlock=True)
POLICIES = [CHILD, CHILD_NO_LANDLOCK, CHILD_SIMULATED, FRONTEND, parent_policy(ALL_ROLES),
            *(parent_policy((role,)) for role in ALL_ROLES)]
THREAD_FLAGS = 0x3D0F00  # glibc's pthread_create: CLONE_VM | CLONE_FS | ... | CLONE_SETTLS
FORK_FLAGS = 0x01000000 | 0x00200000 | 17  # glibc's fork: CHILD_SETTID | CHILD_CLEARTID | SIGCHLD


def _header_numbers(path: str) -> dict[str, int]:
    """__NR_name values, following asm-generic's __NR3264_ indirections."""
    with open(path, encoding="ascii") as f:
        raw = dict(re.findall(r"^#define (__NR\w+)\s+(\w+)", f.read(), re.MULTILINE))
    out = {}
    for key, alias in raw.items():
        value = alias
        while value in raw:
            value = raw[value]
        if key.startswith("__NR_") and value.isdigit():
            out[key[5:]] = int(value)
    return out


# --- the tables ---------------------------------------------------------------------------

@pytest.mark.parametrize(("arch", "header"), [("x86_64", X86_HEADER),
                                              ("aarch64", GENERIC_HEADER)])
def test_syscall_numbers_match_the_kernel_headers(arch, header):
    assert os.path.exists(header), f"{header} missing: make test installs linux-libc-dev"
    numbers = _header_numbers(header)
    assert {name: numbers.get(name) for name in SYSCALLS[arch]} == SYSCALLS[arch]
    assert numbers["seccomp"] == SECCOMP_NR[arch]


def test_audit_arch_values_match_the_header():
    with open("/usr/include/linux/audit.h", encoding="ascii") as f:
        text = f.read()
    assert "AUDIT_ARCH_X86_64\t(EM_X86_64|__AUDIT_ARCH_64BIT|__AUDIT_ARCH_LE)" in text
    assert AUDIT_ARCH == {"x86_64": 62 | 0x80000000 | 0x40000000,
                          "aarch64": 183 | 0x80000000 | 0x40000000}


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.role)
def test_every_name_is_known_and_listed_once(policy):
    names = policy.names()
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
    known = set(SYSCALLS["x86_64"]) | set(SYSCALLS["aarch64"])
    assert sorted(set(names) - known) == []


def test_ioctl_requests_match_the_uapi_values():
    import termios

    assert (FIFREEZE, FITHAW) == (0xC0045877, 0xC0045878)  # _IOWR('X', 119/120, int)
    assert termios.FIONBIO == FIONBIO


# --- compilation: the program decides what the policy says ------------------------------

def reference(policy: Policy, arch: str, nr: int, audit_arch: int, args: tuple[int, ...]) -> int:
    """What the policy means, read directly (no BPF)."""
    if audit_arch != AUDIT_ARCH[arch] or (arch == "x86_64" and nr >= 0x40000000):
        return policy.wrong_arch
    table = SYSCALLS[arch]
    for rule in policy.rules:
        if isinstance(rule, AllowIf):
            if table.get(rule.name) == nr:
                return ALLOW if args[rule.arg] & 0xFFFFFFFF in rule.values else rule.otherwise
        elif isinstance(rule, AllowIfClear):
            if table.get(rule.name) == nr:
                return rule.otherwise if args[rule.arg] & rule.mask & 0xFFFFFFFF else ALLOW
        elif nr in {table[n] for n in rule.names if n in table}:
            return ALLOW if isinstance(rule, Allow) else refuse_with(rule.errno)
    return policy.default


def interesting_calls(arch: str) -> st.SearchStrategy[tuple[int, int, tuple[int, ...]]]:
    nrs = st.one_of(st.sampled_from(sorted(SYSCALLS[arch].values())),
                    st.integers(0, 600), st.integers(0, 2**32 - 1))
    archs = st.one_of(st.just(AUDIT_ARCH[arch]), st.integers(0, 2**32 - 1))
    word = st.one_of(st.sampled_from([FIFREEZE, FITHAW, FIONBIO, 0x5401, 1, 10, FORK_FLAGS,
                                      THREAD_FLAGS, os.O_RDONLY, os.O_RDWR, os.O_WRONLY,
                                      os.O_PATH | os.O_NOFOLLOW, os.O_CREAT | os.O_RDWR]),
                     st.integers(0, 2**64 - 1))
    # a request with high bits set: the kernel ignores them, so must the filter
    sign_extended = st.sampled_from([FIFREEZE | 0xFFFFFFFF00000000, FITHAW | 1 << 40])
    args = st.tuples(*[st.one_of(word, sign_extended)] * 6)
    return st.tuples(nrs, archs, args)


@pytest.mark.parametrize("arch", sorted(SYSCALLS))
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.role)
@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_compiled_filter_decides_as_the_policy_says(policy, arch, data):
    prog = seccomp.compile_policy(policy, arch)
    nr, audit_arch, args = data.draw(interesting_calls(arch))
    assert bpf.run(prog, nr, audit_arch, args) == reference(policy, arch, nr, audit_arch, args)


def test_key_decisions_of_the_child_filter():
    """The policies are built here, not only at import: `make mutate` maps a line to the
    tests that run it, and a test module's import belongs to none of them."""
    nr, arch = SYSCALLS["x86_64"], AUDIT_ARCH["x86_64"]
    assert child_policy(simulated=False, landlock=True).role == "root child, Landlock"
    assert child_policy(simulated=True, landlock=False).role == \
        "root child, simulator's socket"  # the name its errors and measurements go by
    prog = seccomp.compile_policy(child_policy(simulated=False, landlock=True), "x86_64")
    eperm = refuse_with(errno.EPERM)
    assert bpf.run(prog, nr["ioctl"], arch, (3, FIFREEZE)) == ALLOW
    assert bpf.run(prog, nr["ioctl"], arch, (3, FITHAW | 0xFFFFFFFF00000000)) == ALLOW
    assert bpf.run(prog, nr["ioctl"], arch, (3, 0x5401)) == refuse_with(errno.ENOTTY)  # TCGETS
    assert bpf.run(prog, 59, arch) == eperm  # execve
    assert bpf.run(prog, 57, arch) == eperm  # fork(2) itself: glibc's fork is a clone
    # glibc's fork: refused (the thaw guard was forked before the filter)
    assert bpf.run(prog, nr["clone"], arch, (FORK_FLAGS,)) == eperm
    # FREEZE's and THAW's worker threads: glibc's flags exactly, clone3 sent back to clone
    assert bpf.run(prog, nr["clone"], arch, (THREAD_FLAGS,)) == ALLOW
    assert bpf.run(prog, nr["clone3"], arch) == refuse_with(errno.ENOSYS)
    # a thread in a new user namespace, a fork in a new mount namespace, a process sharing
    # the child's memory (no CLONE_THREAD), a bare CLONE_VM | CLONE_THREAD: refused
    for other in (THREAD_FLAGS | 0x10000000, FORK_FLAGS | 0x00020000, THREAD_FLAGS & ~0x10000,
                  0x00010000 | 0x100):
        assert bpf.run(prog, nr["clone"], arch, (other,)) == eperm
    assert bpf.run(prog, nr["mprotect"], arch, (0, 4096, 3)) == ALLOW  # a stack: RW
    assert bpf.run(prog, nr["mprotect"], arch, (0, 4096, 5)) == eperm  # never executable
    assert bpf.run(prog, 165, arch) == eperm  # mount
    for name_nr in (101, 175, 313, 246, 320, 437):  # ptrace, (f)init_module, kexec, openat2
        assert bpf.run(prog, name_nr, arch) == eperm
    for name_nr in (82, 87, 264, 263, 316, 76, 86, 88):  # rename(at)(2), unlink(at), truncate,
        assert bpf.run(prog, name_nr, arch) == eperm     # link, symlink: never a path change
    assert bpf.run(prog, nr["openat"], arch, (3, 0, os.O_RDONLY | os.O_DIRECTORY)) == ALLOW
    assert bpf.run(prog, nr["openat"], arch, (3, 0, os.O_PATH | os.O_NOFOLLOW)) == ALLOW
    assert bpf.run(prog, nr["openat"], arch, (3, 0, os.O_RDWR)) == ALLOW  # Landlock decides
    for flags in (os.O_WRONLY, os.O_RDWR | os.O_CREAT, os.O_RDONLY | os.O_TRUNC,
                  os.O_WRONLY | os.O_APPEND, os.O_TMPFILE | os.O_RDWR):
        assert bpf.run(prog, nr["openat"], arch, (3, 0, flags)) == eperm, oct(flags)
    assert bpf.run(prog, 2, arch) == eperm  # open(2): its flags are not checked, so refused
    assert bpf.run(prog, nr["socket"], arch, (1,)) == eperm  # AF_UNIX: no socket at all
    assert bpf.run(prog, nr["connect"], arch) == eperm
    assert bpf.run(prog, nr["read"] | 0x40000000, arch) == eperm  # x32
    assert bpf.run(prog, nr["read"], 0x40000003) == eperm  # i386: never kills the child
    no_landlock = seccomp.compile_policy(child_policy(simulated=False, landlock=False),
                                         "x86_64")
    assert bpf.run(no_landlock, nr["openat"], arch, (3, 0, os.O_RDWR)) == eperm
    assert bpf.run(no_landlock, nr["openat"], arch, (3, 0, os.O_RDONLY)) == ALLOW
    simulated = seccomp.compile_policy(child_policy(simulated=True, landlock=True), "x86_64")
    assert bpf.run(simulated, nr["socket"], arch, (1,)) == ALLOW
    assert bpf.run(simulated, nr["socket"], arch, (2,)) == refuse_with(errno.EAFNOSUPPORT)
    assert bpf.run(simulated, nr["connect"], arch) == ALLOW


def test_only_a_simulator_socket_lets_the_child_make_sockets(tmp_path):
    sim = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sim.bind(str(tmp_path / "vss.sock"))
    try:
        assert is_simulator(str(tmp_path / "vss.sock"))
        os.symlink(tmp_path / "vss.sock", tmp_path / "link")
        assert not is_simulator(str(tmp_path / "link"))  # never through a symlink
    finally:
        sim.close()
    assert not is_simulator("/dev/null")  # a character device, like hv_vss
    assert not is_simulator(str(tmp_path / "missing"))
    assert not is_simulator(None)


def test_roles_merge_to_what_any_of_them_allows():
    arch, nr = AUDIT_ARCH["x86_64"], SYSCALLS["x86_64"]
    service = seccomp.compile_policy(parent_policy(("service",)), "x86_64")
    full = seccomp.compile_policy(parent_policy(("service", "frontend", "metrics")), "x86_64")
    eacces = refuse_with(errno.EACCES)
    assert bpf.run(service, nr["openat"], arch, (5, 0, METRICS_OPEN)) == eacces
    assert bpf.run(full, nr["openat"], arch, (5, 0, METRICS_OPEN)) == ALLOW
    assert bpf.run(full, nr["openat"], arch, (5, 0, os.O_RDONLY)) == eacces  # nothing read
    assert bpf.run(service, nr["kill"], arch) == KILL_PROCESS
    assert bpf.run(full, nr["kill"], arch) == ALLOW
    assert bpf.run(full, 57, arch) == KILL_PROCESS  # fork: the parent never starts a process


def test_key_decisions_of_the_parent_filter():
    prog, nr = seccomp.compile_policy(parent_policy(("service",)), "x86_64"), SYSCALLS["x86_64"]
    arch = AUDIT_ARCH["x86_64"]
    assert bpf.run(prog, 59, arch) == KILL_PROCESS  # execve
    assert bpf.run(prog, nr["ioctl"], arch, (3, FIONBIO)) == ALLOW
    assert bpf.run(prog, nr["ioctl"], arch, (3, FIFREEZE)) == refuse_with(errno.ENOTTY)
    assert bpf.run(prog, nr["openat"], arch) == refuse_with(errno.EACCES)
    assert bpf.run(prog, nr["read"], 0x40000003) == KILL_PROCESS


# --- the real kernel ----------------------------------------------------------------------

def confined(policy_expr: str, body: str, setup: str = "",
             timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run `setup`, load the filter `policy_expr`, then run `body`, in a fresh interpreter."""
    code = textwrap.dedent(f"""\
        import ctypes, errno, fcntl, os, socket, sys, threading
        sys.path.insert(0, {REPO!r})
        from privileged import seccomp
        from privileged.sandbox import child_policy
        ROOT_CHILD = child_policy(simulated=False, landlock=False)
        from agent.sandbox_linux import parent_policy
        def fails(fn, *a):
            try:
                fn(*a)
            except OSError as e:
                return errno.errorcode[e.errno]
            return "allowed"
        """) + textwrap.dedent(setup) + f"seccomp.confine({policy_expr}, all_threads=True)\n" \
        + textwrap.dedent(body)
    return subprocess.run([PY, "-I", "-c", code], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_child_filter_in_the_kernel_freezes_and_refuses_the_rest(make_fs, workdir):
    fs = make_fs("ext4")
    outside = os.path.join(workdir, "outside")
    proc = confined("ROOT_CHILD", f"""
        fd = os.open({fs.mountpoint!r}, os.O_RDONLY | os.O_DIRECTORY)
        print(fails(fcntl.ioctl, fd, 0xC0045877, 0))  # FIFREEZE
        print(fails(fcntl.ioctl, fd, 0xC0045878, 0))  # FITHAW
        print(fails(fcntl.ioctl, fd, 0x80086601, b"\\0" * 8))  # FS_IOC_GETFLAGS
        print(fails(os.execv, "/bin/true", ["true"]))
        print(fails(os.fork))  # no process: the thaw guard was forked before the filter
        # a worker thread, as FREEZE starts them: it freezes; the main thread thaws
        worker = threading.Thread(target=lambda: print("thread", fails(fcntl.ioctl, fd,
                                                                     0xC0045877, 0)))
        worker.start()
        worker.join()
        print(fails(fcntl.ioctl, fd, 0xC0045878, 0))
        print(fails(socket.socket, socket.AF_INET, socket.SOCK_STREAM))
        print(fails(socket.socket, socket.AF_UNIX, socket.SOCK_STREAM))
        print(fails(os.setuid, 0))
        print(fails(os.chroot, "/"))
        print(fails(os.open, {outside!r}, os.O_WRONLY | os.O_CREAT, 0o600))
        print(fails(os.open, "/proc/sys/kernel/core_pattern", os.O_RDWR))
        print(fails(os.rename, {fs.mountpoint!r} + "/a", {fs.mountpoint!r} + "/b"))
        with open("/proc/self/status") as f:
            print([l.split()[1] for l in f if l.startswith("Seccomp:")][0])
        """)
    assert proc.stdout.split() == ["allowed", "allowed", "ENOTTY", "EPERM", "EPERM", "thread",
                                   "allowed", "allowed", "EPERM", "EPERM", "EPERM", "EPERM",
                                   "EPERM", "EPERM", "EPERM", "2"], proc.stderr
    assert not os.path.exists(outside)
    assert_writable(fs.mountpoint)


@pytest.mark.parametrize("forbidden", ["os.execv('/bin/true', ['true'])", "os.fork()",
                                       "os.kill(1, 0)", "os.setsid()",
                                       "ctypes.CDLL(None).ptrace(16, 1, 0, 0)"])  # ATTACH
def test_parent_filter_kills_on_anything_not_allowed(forbidden):
    proc = confined("parent_policy(('service',))", f"""
        print("before", flush=True)
        {forbidden}
        print("after", flush=True)
        """)
    assert (proc.returncode, proc.stdout) == (-SIGSYS, "before\n")


def test_parent_filter_answers_what_python_copes_with():
    proc = confined("parent_policy(('service',))", setup="a, b = socket.socketpair()\n", body="""
        a.settimeout(1.0)  # ioctl(FIONBIO)
        print(fails(open, "/etc/hostname"))
        print(fails(socket.socket, socket.AF_INET, socket.SOCK_DGRAM))
        print(os.isatty(0))  # TCGETS: ENOTTY, "not a terminal"
        """)
    assert (proc.returncode, proc.stdout.split()) == (0, ["EACCES", "EAFNOSUPPORT", "False"])


def test_frontend_filter_starts_threads_and_nothing_else():
    proc = confined("FRONTEND", setup="from agent.sandbox_linux import FRONTEND\n", body="""
        t = threading.Thread(target=lambda: print("thread ran", flush=True))
        t.start()
        t.join()
        print(fails(open, "/etc/hostname"), flush=True)
        os.fork()
        print("forked", flush=True)
        """)
    assert (proc.returncode, proc.stdout.split("\n")) == (-SIGSYS, ["thread ran", "EACCES", ""])


def test_tsync_puts_the_filter_on_threads_that_already_run():
    # The thread sits in read(); after printing, _exit: no futex or thread exit,
    # which the child's filter (used here because it may read /proc) refuses.
    proc = confined("ROOT_CHILD", setup="""
        r, w = os.pipe()
        threading.Thread(target=os.read, args=(r, 1), daemon=True).start()
        """, body="""
        for tid in sorted(os.listdir("/proc/self/task")):
            with open(f"/proc/self/task/{tid}/status") as f:
                print([l.split()[1] for l in f if l.startswith("Seccomp:")][0], flush=True)
        os._exit(0)
        """)
    assert (proc.returncode, proc.stdout.split()) == (0, ["2", "2"]), proc.stderr


def test_unknown_architecture_is_refused(monkeypatch):
    riscv = os.uname_result(("Linux", "host", "6.1", "#1", "riscv64"))
    monkeypatch.setattr(os, "uname", lambda: riscv)
    with pytest.raises(seccomp.SandboxError, match="riscv64"):
        seccomp.native_arch()


LONGEST_FILTER = textwrap.dedent("""\
    import sys
    sys.path.insert(0, sys.argv[1])
    from privileged import seccomp
    arch = seccomp.native_arch()

    def policy(n):  # one AllowIf (5 instructions) makes the length even, each name adds 2
        return seccomp.Policy("longest", (
            seccomp.AllowIf("an argument", "ioctl", 1, (1,), seccomp.KILL_PROCESS),
            seccomp.Allow("a long list", ("getpid",) * n)), seccomp.ALLOW)

    n = (4096 - len(seccomp.compile_policy(policy(0), arch))) // 2
    try:
        seccomp.compile_policy(policy(n + 1), arch)
    except seccomp.SandboxError as e:
        print("refused:", e)
    seccomp.confine(policy(n), all_threads=False)
    print("loaded:", len(seccomp.compile_policy(policy(n), arch)))
""")


def test_a_filter_as_long_as_the_kernel_takes_is_loaded_and_one_longer_is_refused():
    """The kernel takes up to BPF_MAXINSNS (4096) instructions: the compiler refuses what
    it would not, with our words, and not what it would."""
    proc = subprocess.run([PY, "-I", "-c", LONGEST_FILTER, REPO], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["refused: the longest filter has 4098 instructions",
                                        "loaded: 4096"]


def test_a_failed_libc_call_is_an_oserror_with_its_errno():
    with pytest.raises(OSError) as e:
        libc.function("close")(-1)
    assert e.value.errno == errno.EBADF


def test_an_x32_call_takes_the_wrong_arch_action_whatever_the_default():
    """x32 shares x86_64's AUDIT_ARCH, its numbers with bit 30 set: a filter whose default
    allowed would otherwise let every x32 call through."""
    nr, arch = SYSCALLS["x86_64"]["read"], AUDIT_ARCH["x86_64"]
    prog = seccomp.compile_policy(Policy("allowing", (), ALLOW), "x86_64")
    assert bpf.run(prog, nr, arch) == ALLOW
    assert bpf.run(prog, nr | 0x40000000, arch) == KILL_PROCESS
    assert bpf.run(prog, nr, 0x40000003) == KILL_PROCESS  # i386 (int 0x80): not this arch
