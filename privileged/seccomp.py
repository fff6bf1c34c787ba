"""Linux seccomp filters: an allowlist compiled to classic BPF, then loaded.

Why a filter built here and not libseccomp's Python bindings: the root child
is standard-library only by rule (privileged/ must not grow a dependency
that runs as root), Debian's python3-seccomp is built for the system
interpreter only and does not load in a virtualenv of another Python, and
pyseccomp (ctypes over libseccomp.so) is unmaintained since 2021.  What we
need is small: an architecture check, a list of syscall numbers, and one
argument test (ioctl's request).  The compiled program is a flat list that
a test can read instruction by instruction.

Facts this relies on (seccomp(2), Documentation/userspace-api/seccomp_filter.rst):
- the filter sees struct seccomp_data: nr at offset 0, arch at 4, then six
  64-bit arguments from offset 16, each read as two 32-bit words (little
  endian here: the low word first);
- on x86_64 a syscall number with bit 30 set is the x32 ABI under the same
  AUDIT_ARCH value: it must be refused explicitly;
- every argument a filter here tests is one the kernel reads as 32 bits:
  ioctl's `unsigned int cmd`, socket's `int family`, openat's `int flags`,
  clone's flags (kernel/fork.c takes lower_32_bits()).  So only the low word
  is compared: comparing all 64 bits would not be stricter, it would only
  refuse a caller that sign-extends, as some do with ioctl requests;
- SECCOMP_FILTER_FLAG_TSYNC applies the filter to every thread of the
  process at once (or fails, naming the thread that cannot take it);
  SECCOMP_FILTER_FLAG_LOG makes the kernel log every action but ALLOW, so a
  refused call shows in the kernel log (audit type 1326) with pid and number;
- a process without CAP_SYS_ADMIN must set no_new_privs first.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

from privileged.syscall_table import AUDIT_ARCH, SECCOMP_NR, SYSCALLS

# Actions (the high 16 bits of a filter's return value).
ALLOW = 0x7FFF0000
KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000

# Classic BPF opcodes used here.
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06

_OFF_NR = 0
_OFF_ARCH = 4
_X32_SYSCALL_BIT = 0x40000000
_MAX_INSNS = 4096

_SECCOMP_SET_MODE_FILTER = 1
_FLAG_TSYNC = 1
_FLAG_LOG = 2
_PR_SET_NO_NEW_PRIVS = 38


class SandboxError(OSError):
    """The sandbox cannot be built or installed here; start-up stops."""


def refuse_with(err: int) -> int:
    """The action that fails a syscall with `err` without running it."""
    return _RET_ERRNO | (err & 0xFFFF)


@dataclass(frozen=True)
class Allow:
    """Syscalls allowed with any arguments."""

    why: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class AllowIf:
    """One syscall, allowed only when argument `arg` (low 32 bits) is in `values`."""

    why: str
    name: str
    arg: int
    values: tuple[int, ...]
    otherwise: int  # the action for every other value


@dataclass(frozen=True)
class AllowIfClear:
    """One syscall, allowed only when argument `arg` (low 32 bits) has none of `mask`'s
    bits set (open flags: no write access, no create)."""

    why: str
    name: str
    arg: int
    mask: int
    otherwise: int


@dataclass(frozen=True)
class Refuse:
    """Syscalls answered with an errno, for callers that handle it (glibc fallbacks)."""

    why: str
    names: tuple[str, ...]
    errno: int


Rule = Allow | AllowIf | AllowIfClear | Refuse


@dataclass(frozen=True)
class Policy:
    """One process role's filter: its rules, then `default` for everything else."""

    role: str
    rules: tuple[Rule, ...]
    default: int
    wrong_arch: int = KILL_PROCESS

    def names(self) -> list[str]:
        out: list[str] = []
        for r in self.rules:
            out += list(r.names) if isinstance(r, Allow | Refuse) else [r.name]
        return out

    def allowed(self) -> frozenset[str]:
        """Names this policy lets reach the kernel (some only with certain arguments)."""
        out: set[str] = set()
        for r in self.rules:
            if isinstance(r, Allow):
                out |= set(r.names)
            elif isinstance(r, AllowIf | AllowIfClear):
                out.add(r.name)
        return frozenset(out)


Insn = tuple[int, int, int, int]  # code, jt, jf, k (struct sock_filter)


def native_arch() -> str:
    """The syscall ABI this interpreter uses, if we have a table for it."""
    machine = os.uname().machine
    if sys.maxsize <= 2**32 or machine not in SYSCALLS:
        raise SandboxError(f"no seccomp syscall table for this architecture ({machine}, "
                           f"{64 if sys.maxsize > 2**32 else 32}-bit Python)")
    return machine


def compile_policy(policy: Policy, arch: str) -> list[Insn]:
    """The BPF program for `policy` on `arch`.  Names the arch lacks are skipped."""
    table = SYSCALLS[arch]
    prog: list[Insn] = [
        (_LD_W_ABS, 0, 0, _OFF_ARCH),
        (_JEQ_K, 1, 0, AUDIT_ARCH[arch]),
        (_RET_K, 0, 0, policy.wrong_arch),
        (_LD_W_ABS, 0, 0, _OFF_NR),
    ]
    if arch == "x86_64":
        prog += [(_JGE_K, 0, 1, _X32_SYSCALL_BIT), (_RET_K, 0, 0, policy.wrong_arch)]
    for rule in policy.rules:
        if isinstance(rule, AllowIf):
            if rule.name not in table:
                continue
            block = [(_LD_W_ABS, 0, 0, 16 + 8 * rule.arg)]
            for v in rule.values:
                block += [(_JEQ_K, 0, 1, v & 0xFFFFFFFF), (_RET_K, 0, 0, ALLOW)]
            block.append((_RET_K, 0, 0, rule.otherwise))
            prog.append((_JEQ_K, 0, len(block), table[rule.name]))
            prog += block
            continue
        if isinstance(rule, AllowIfClear):
            if rule.name not in table:
                continue
            block = [(_LD_W_ABS, 0, 0, 16 + 8 * rule.arg),
                     (_JSET_K, 0, 1, rule.mask & 0xFFFFFFFF),
                     (_RET_K, 0, 0, rule.otherwise),
                     (_RET_K, 0, 0, ALLOW)]
            prog.append((_JEQ_K, 0, len(block), table[rule.name]))
            prog += block
            continue
        action = ALLOW if isinstance(rule, Allow) else refuse_with(rule.errno)
        for name in rule.names:
            if name in table:
                prog += [(_JEQ_K, 0, 1, table[name]), (_RET_K, 0, 0, action)]
    prog.append((_RET_K, 0, 0, policy.default))
    if len(prog) > _MAX_INSNS:
        raise SandboxError(f"the {policy.role} filter has {len(prog)} instructions")
    return prog


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


class Loader:
    """libc resolved now: nothing is loaded once a filter is on."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)

    def install(self, prog: list[Insn], arch: str, *, all_threads: bool) -> None:
        if self._libc.prctl(_PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), ctypes.c_ulong(0),
                            ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
            raise SandboxError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        insns = (_SockFilter * len(prog))(*(_SockFilter(*i) for i in prog))
        fprog = _SockFprog(len(prog), ctypes.cast(insns, ctypes.POINTER(_SockFilter)))
        flags = _FLAG_LOG | (_FLAG_TSYNC if all_threads else 0)
        rc = self._libc.syscall(ctypes.c_long(SECCOMP_NR[arch]),
                                ctypes.c_long(_SECCOMP_SET_MODE_FILTER), ctypes.c_long(flags),
                                ctypes.byref(fprog))
        if rc < 0:
            e = ctypes.get_errno()
            raise SandboxError(e, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(e)}")
        if rc > 0:
            raise SandboxError(f"seccomp: thread {rc} could not take the filter (TSYNC)")


def confine(policy: Policy, *, all_threads: bool, loader: Loader | None = None) -> None:
    """Compile `policy` for this machine and load it; irreversible."""
    arch = native_arch()
    (loader or Loader()).install(compile_policy(policy, arch), arch, all_threads=all_threads)
