"""The seccomp filters a running process really has, read from outside, and run.

PTRACE_SECCOMP_GET_FILTER hands root (CAP_SYS_ADMIN) the classic-BPF program of each
filter attached to a stopped tracee; index 0 is the oldest (measured: a process that
loaded A then B yields A at 0, B at 1).  `decide` runs them all on one
syscall as the kernel does (each filter sees the same seccomp_data; the action of
lowest precedence value wins), so a test can ask what systemd's filters, as loaded by
systemd, do to a given call, without trusting systemd's or libseccomp's description
of them.  The interpreter covers the whole classic-BPF instruction set a seccomp
filter may use (no packet loads beyond seccomp_data).
"""

from __future__ import annotations

import ctypes
import errno
import operator
import os
import struct

PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_SECCOMP_GET_FILTER = 0x420C
WALL = 0x40000000

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
X32_SYSCALL_BIT = 0x40000000

RET_KILL_PROCESS = 0x80000000
RET_KILL_THREAD = 0x00000000
RET_TRAP = 0x00030000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000
ACTION = 0xFFFF0000

Insn = tuple[int, int, int, int]
_ALU = {0x00: operator.add, 0x10: operator.sub, 0x20: operator.mul, 0x30: operator.floordiv,
        0x40: operator.or_, 0x50: operator.and_, 0x60: operator.lshift, 0x70: operator.rshift,
        0x90: operator.mod, 0xA0: operator.xor}
SECCOMP_DATA = struct.Struct("<IIQ6Q")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def _ptrace(request: int, pid: int, addr: int, data: ctypes.Array[ctypes.c_char] | None) -> int:
    ret = _libc.ptrace(request, pid, addr, data)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ptrace({request:#x}, {pid}): {os.strerror(err)}")
    return int(ret)


def filters_of(pid: int) -> list[list[Insn]]:
    """Every seccomp filter of `pid`, oldest first.  Stops it for the time it takes."""
    _ptrace(PTRACE_SEIZE, pid, 0, None)
    try:
        _ptrace(PTRACE_INTERRUPT, pid, 0, None)
        os.waitpid(pid, WALL)
        out: list[list[Insn]] = []
        while True:
            try:
                count = _ptrace(PTRACE_SECCOMP_GET_FILTER, pid, len(out), None)
            except OSError as e:
                if e.errno == errno.ENOENT:  # no filter with this index: that was all
                    return out
                raise
            buf = ctypes.create_string_buffer(8 * count)
            _ptrace(PTRACE_SECCOMP_GET_FILTER, pid, len(out), buf)
            out.append([struct.unpack_from("<HBBI", buf.raw, 8 * i) for i in range(count)])
    finally:
        _ptrace(PTRACE_DETACH, pid, 0, None)


def run(prog: list[Insn], data: bytes) -> int:
    """One classic-BPF program on one struct seccomp_data."""
    a = x = 0
    mem = [0] * 16
    pc = 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        cls = code & 0x07
        if cls == 0x00:  # BPF_LD
            mode = code & 0xE0
            if mode == 0x20:  # ABS, word only in seccomp
                (a,) = struct.unpack_from("<I", data, k)
            elif mode == 0x00:  # IMM
                a = k
            elif mode == 0x60:  # MEM
                a = mem[k]
            elif mode == 0x80:  # LEN
                a = len(data)
            else:
                raise ValueError(f"ld mode {code:#x}")
        elif cls == 0x01:  # BPF_LDX
            mode = code & 0xE0
            x = {0x00: k, 0x60: mem[k] if k < 16 else 0, 0x80: len(data)}[mode]
        elif cls == 0x02:  # BPF_ST
            mem[k] = a
        elif cls == 0x03:  # BPF_STX
            mem[k] = x
        elif cls == 0x04:  # BPF_ALU
            src = x if code & 0x08 else k
            op = code & 0xF0
            a = (-a if op == 0x80 else _ALU[op](a, src)) & 0xFFFFFFFF
        elif cls == 0x05:  # BPF_JMP
            op = code & 0xF0
            if op == 0x00:  # JA
                pc += k
                continue
            src = x if code & 0x08 else k
            taken = {0x10: a == src, 0x20: a > src, 0x30: a >= src, 0x40: bool(a & src)}[op]
            pc += jt if taken else jf
        elif cls == 0x06:  # BPF_RET
            return a if code & 0x18 == 0x10 else k
        elif cls == 0x07:  # BPF_MISC
            if code & 0xF8 == 0x00:
                x = a
            else:
                a = x


def decide(filters: list[list[Insn]], nr: int, args: tuple[int, ...] = (),
           arch: int = AUDIT_ARCH_X86_64) -> int:
    """What the kernel does with this call under all `filters`: the full return value."""
    data = SECCOMP_DATA.pack(nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    rets = [run(f, data) for f in filters]

    def precedence(ret: int) -> int:  # the kernel compares the action as signed 32 bits
        action = ret & ACTION
        return action - (1 << 32) if action & 0x80000000 else action

    return min(rets, key=precedence)


def describe(ret: int) -> str:
    action, value = ret & ACTION, ret & 0xFFFF
    if action == RET_ERRNO:
        return f"errno {errno.errorcode.get(value, value)}"
    return {RET_ALLOW: "allow", RET_KILL_PROCESS: "kill process", RET_KILL_THREAD: "kill thread",
            RET_TRAP: "trap"}.get(action, f"action {action:#x}")
