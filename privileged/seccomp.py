"""Linux seccomp filters: an allowlist compiled to classic BPF, then loaded.

One compiler for the three processes' filters (the root child's,
privileged/sandbox.py; the parent's and the frontend's, agent/sandbox_linux.py):
each is a table of rules with their reasons, and the compiled program is a
flat list of instructions that a test can read and run (tests/bpf.py).  Why
not libseccomp (through ctypes, where it is installed): see SECURITY.md,
"The root child's seccomp filter".  The rules are plain classes, not
dataclasses: dataclasses would load some forty standard modules into root.

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
import struct
import sys

from privileged import libc
from privileged.syscall_table import AUDIT_ARCH, SECCOMP_NR, SYSCALLS

# Actions (the high 16 bits of a filter's return value).
ALLOW = 0x7FFF0000
KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000

# Classic BPF: load the 32-bit word at k; jump if equal, greater or equal, any bit set;
# return k.  Offsets in struct seccomp_data: nr 0, arch 4, argument i at 16 + 8 i.
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_OFF_NR, _OFF_ARCH = 0, 4
_X32_SYSCALL_BIT = 0x40000000
_MAX_INSNS = 4096
_SECCOMP_SET_MODE_FILTER, _FLAG_TSYNC, _FLAG_LOG = 1, 1, 2
_PR_SET_NO_NEW_PRIVS = 38


class SandboxError(OSError):
    """The sandbox cannot be built or installed here; start-up stops."""


def refuse_with(err: int) -> int:
    """The action that fails a syscall with `err` without running it."""
    return _RET_ERRNO | (err & 0xFFFF)


class Allow:
    """Syscalls allowed with any arguments."""

    def __init__(self, why: str, names: tuple[str, ...]) -> None:
        self.why, self.names = why, names


class Refuse:
    """Syscalls answered with an errno, for callers that handle it (glibc fallbacks)."""

    def __init__(self, why: str, names: tuple[str, ...], errno: int) -> None:
        self.why, self.names, self.errno = why, names, errno


class AllowIf:
    """One syscall, allowed only when argument `arg` (low 32 bits) is in `values`;
    `otherwise` is the action for every other value."""

    def __init__(self, why: str, name: str, arg: int, values: tuple[int, ...],
                 otherwise: int) -> None:
        self.why, self.name, self.arg, self.values, self.otherwise = why, name, arg, values, \
            otherwise


class AllowIfClear:
    """One syscall, allowed only when argument `arg` (low 32 bits) has none of `mask`'s bits
    set (open flags: no write access, no create)."""

    def __init__(self, why: str, name: str, arg: int, mask: int, otherwise: int) -> None:
        self.why, self.name, self.arg, self.mask, self.otherwise = why, name, arg, mask, otherwise


Rule = Allow | AllowIf | AllowIfClear | Refuse
Insn = tuple[int, int, int, int]  # code, jt, jf, k (struct sock_filter)


class Policy:
    """One process role's filter: its rules, then `default` for everything else."""

    def __init__(self, role: str, rules: tuple[Rule, ...], default: int,
                 wrong_arch: int = KILL_PROCESS) -> None:
        self.role, self.rules, self.default, self.wrong_arch = role, rules, default, wrong_arch

    def names(self) -> list[str]:
        return [n for r in self.rules for n in (r.names if isinstance(r, Allow | Refuse)
                                                else (r.name,))]

    def allowed(self) -> frozenset[str]:
        """Names this policy lets reach the kernel (some only with certain arguments)."""
        return frozenset(n for r in self.rules if not isinstance(r, Refuse)
                         for n in (r.names if isinstance(r, Allow) else (r.name,)))


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
    prog: list[Insn] = [(_LD_W_ABS, 0, 0, _OFF_ARCH), (_JEQ_K, 1, 0, AUDIT_ARCH[arch]),
                        (_RET_K, 0, 0, policy.wrong_arch), (_LD_W_ABS, 0, 0, _OFF_NR)]
    if arch == "x86_64":  # the x32 ABI: the same AUDIT_ARCH, syscall numbers with bit 30 set
        prog += [(_JGE_K, 0, 1, _X32_SYSCALL_BIT), (_RET_K, 0, 0, policy.wrong_arch)]
    for rule in policy.rules:
        if isinstance(rule, Allow | Refuse):
            action = ALLOW if isinstance(rule, Allow) else refuse_with(rule.errno)
            for name in (n for n in rule.names if n in table):
                prog += [(_JEQ_K, 0, 1, table[name]), (_RET_K, 0, 0, action)]
            continue
        if rule.name not in table:
            continue
        block = [(_LD_W_ABS, 0, 0, 16 + 8 * rule.arg)]  # the argument's low word
        if isinstance(rule, AllowIf):
            for v in rule.values:
                block += [(_JEQ_K, 0, 1, v & 0xFFFFFFFF), (_RET_K, 0, 0, ALLOW)]
            block.append((_RET_K, 0, 0, rule.otherwise))
        else:
            block += [(_JSET_K, 0, 1, rule.mask & 0xFFFFFFFF), (_RET_K, 0, 0, rule.otherwise),
                      (_RET_K, 0, 0, ALLOW)]
        prog += [(_JEQ_K, 0, len(block), table[rule.name]), *block]
    prog.append((_RET_K, 0, 0, policy.default))
    if len(prog) > _MAX_INSNS:
        raise SandboxError(f"the {policy.role} filter has {len(prog)} instructions")
    return prog


def confine(policy: Policy, *, all_threads: bool) -> None:
    """Compile `policy` for this machine and load it, after no_new_privs; irreversible.
    With `all_threads`, every thread takes it at once (TSYNC) or none does; each action
    but ALLOW is logged by the kernel (audit type 1326)."""
    arch = native_arch()
    prog = compile_policy(policy, arch)
    insns = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
    fprog = struct.pack("HP", len(prog), ctypes.addressof(insns))  # struct sock_fprog
    try:
        libc.function("prctl")(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        rc = libc.function("syscall")(SECCOMP_NR[arch], _SECCOMP_SET_MODE_FILTER,
                                      _FLAG_LOG | (_FLAG_TSYNC if all_threads else 0), fprog)
    except OSError as e:
        raise SandboxError(e.errno, f"seccomp: {e.strerror}") from None
    if rc > 0:
        raise SandboxError(f"seccomp: thread {rc} could not take the filter (TSYNC)")
