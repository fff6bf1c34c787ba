"""[freeze] rcu_expedited: the kernel's RCU grace periods expedited while we freeze (Linux).

Each FIFREEZE waits for RCU grace periods (privileged/concurrent.py); with
/sys/kernel/rcu_expedited = 1 the kernel forces each one through at once, by
interrupting every CPU, instead of letting it end by itself: a FIFREEZE then
takes about a millisecond instead of tens.  The setting is the whole system's:
while it is 1, every synchronize_rcu() of every subsystem is expedited, which
costs every CPU an interrupt per grace period (real-time workloads notice).
So it is an opt-in, on only from just before the first FIFREEZE until the last
one returns (or the watchdog's deadline passes), and only if it was 0 before.

The file is opened read-write at start-up, before the sandbox (which allows
no such open afterwards).  Before writing 1, the child appends the value to
restore to the crash record (privileged/statefile.py), and a mark once it is
restored; a child killed in between leaves the record, and the next child
restores the value at start-up, as it thaws what the record names.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

PATH = "/sys/kernel/rcu_expedited"


class Expedite:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.restore_to: bytes | None = None

    @classmethod
    def open(cls) -> Expedite:
        """OSError (one line) if the file cannot be written: a read-only /sys (systemd's
        ProtectKernelTunables=), a kernel without it."""
        try:
            return cls(os.open(PATH, os.O_RDWR | os.O_CLOEXEC))
        except OSError as e:
            raise OSError(e.errno, f"[freeze] rcu_expedited: cannot open {PATH} for writing: "
                                   f"{e.strerror}") from None

    def on(self, note: Callable[[str], None]) -> None:
        """Expedite, if it is not already; `note(value)` first records what to restore."""
        os.lseek(self.fd, 0, os.SEEK_SET)
        before = os.read(self.fd, 16).strip()
        if before != b"0":
            return  # already expedited (or a value we do not know): nothing to undo
        note(before.decode("ascii"))
        os.pwrite(self.fd, b"1", 0)
        self.restore_to = before

    def off(self, restored: Callable[[], None]) -> None:
        """Restore what on() changed, then `restored()`; safe to call again."""
        if self.restore_to is None:
            return
        value, self.restore_to = self.restore_to, None
        os.pwrite(self.fd, value, 0)
        restored()


def recover(value: str) -> str:
    """Put back what a killed predecessor left expedited (at start-up, before the sandbox)."""
    if value not in ("0", "1"):
        return f"{PATH}: the crash record holds {value!r}: left as it is"
    fd = os.open(PATH, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode("ascii"))
    finally:
        os.close(fd)
    return f"restored {PATH} to {value}, left expedited by a previous instance"
