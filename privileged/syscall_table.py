"""Syscall numbers for the seccomp filters, per architecture (no I/O).

Only the names our filters use.  x86_64 from asm/unistd_64.h; aarch64 from
asm-generic/unistd.h, which arm64 uses (it has no open, poll, select,
rename or unlink: glibc calls the *at and p* variants there).
tests/test_seccomp.py checks every number against the headers installed
on the test machine.  To allow a new syscall, add its number for each
architecture here first.
"""

from __future__ import annotations

#: AUDIT_ARCH_* (include/uapi/linux/audit.h): what seccomp_data.arch holds.
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}

SECCOMP_NR = {"x86_64": 317, "aarch64": 277}

X86_64: dict[str, int] = {
    "accept4": 288, "brk": 12, "clock_gettime": 228, "clock_nanosleep": 230, "clone": 56,
    "clone3": 435, "close": 3, "connect": 42, "exit": 60, "exit_group": 231, "fchmod": 91,
    "fcntl": 72, "fstat": 5, "ftruncate": 77, "futex": 202, "getdents64": 217,
    "getpeername": 52, "getpid": 39, "getsockname": 51, "getsockopt": 55, "gettid": 186,
    "gettimeofday": 96, "ioctl": 16, "kill": 62, "lseek": 8, "madvise": 28, "mmap": 9,
    "mprotect": 10, "mremap": 25, "munmap": 11, "newfstatat": 262, "open": 2, "openat": 257,
    "pipe2": 293, "poll": 7, "ppoll": 271, "pselect6": 270, "pwrite64": 18, "read": 0,
    "recvfrom": 45, "recvmsg": 47, "rename": 82, "renameat": 264, "renameat2": 316,
    "restart_syscall": 219, "rseq": 334, "rt_sigaction": 13, "rt_sigprocmask": 14,
    "rt_sigreturn": 15, "select": 23, "sendmsg": 46, "sendto": 44, "set_robust_list": 273,
    "socket": 41, "syncfs": 306, "unlink": 87, "unlinkat": 263, "wait4": 61, "write": 1,
}

AARCH64: dict[str, int] = {
    "accept4": 242, "brk": 214, "clock_gettime": 113, "clock_nanosleep": 115, "clone": 220,
    "clone3": 435, "close": 57, "connect": 203, "exit": 93, "exit_group": 94, "fchmod": 52,
    "fcntl": 25, "fstat": 80, "ftruncate": 46, "futex": 98, "getdents64": 61,
    "getpeername": 205, "getpid": 172, "getsockname": 204, "getsockopt": 209, "gettid": 178,
    "gettimeofday": 169, "ioctl": 29, "kill": 129, "lseek": 62, "madvise": 233, "mmap": 222,
    "mprotect": 226, "mremap": 216, "munmap": 215, "newfstatat": 79, "openat": 56, "pipe2": 59,
    "ppoll": 73, "pselect6": 72, "pwrite64": 68, "read": 63, "recvfrom": 207, "recvmsg": 212,
    "renameat": 38, "renameat2": 276, "restart_syscall": 128, "rseq": 293, "rt_sigaction": 134,
    "rt_sigprocmask": 135, "rt_sigreturn": 139, "sendmsg": 211, "sendto": 206,
    "set_robust_list": 99, "socket": 198, "syncfs": 267, "unlinkat": 35, "wait4": 260,
    "write": 64,
}

SYSCALLS: dict[str, dict[str, int]] = {"x86_64": X86_64, "aarch64": AARCH64}
