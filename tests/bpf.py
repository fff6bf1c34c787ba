"""A classic-BPF interpreter for the instructions privileged/seccomp.py emits.

It runs a compiled filter on a struct seccomp_data, as the kernel would, so
tests can ask what a filter decides for any syscall and arguments without
loading it.  Unknown opcodes raise: the compiler must not emit what this
interpreter (and the reviewer) cannot read.
"""

from __future__ import annotations

import struct

from privileged.seccomp import Insn

# nr (an int, compared as 32 bits), arch, instruction_pointer, args[6]
SECCOMP_DATA = struct.Struct("<IIQ6Q")


def run(prog: list[Insn], nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    data = SECCOMP_DATA.pack(nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == 0x20:  # ld w abs
            (acc,) = struct.unpack_from("<I", data, k)
            pc += 1
        elif code == 0x15:  # jeq k
            pc += 1 + (jt if acc == k else jf)
        elif code == 0x35:  # jge k
            pc += 1 + (jt if acc >= k else jf)
        elif code == 0x45:  # jset k
            pc += 1 + (jt if acc & k else jf)
        elif code == 0x06:  # ret k
            return k
        else:
            raise ValueError(f"opcode {code:#x} at {pc}")
