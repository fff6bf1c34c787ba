"""The C library, for the few calls Python's os module lacks (prctl, capget, syncfs,
seccomp, Landlock, getfsstat): one ctypes handle, and one way to call it.

Functions are looked up when a module asks for them, at import or start-up:
once the sandbox is on, nothing is resolved or loaded any more.
"""

from __future__ import annotations

import ctypes
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

_LIBC = ctypes.CDLL(None, use_errno=True)


def function(name: str) -> Callable[..., int]:
    """libc's `name`, resolved now.  Integer arguments are passed as C longs (what prctl
    and syscall read), others as they are (pointers); a negative return is an OSError."""
    fn = getattr(_LIBC, name)

    def call(*args: object) -> int:
        rc = int(fn(*(ctypes.c_long(a) if isinstance(a, int) else a for a in args)))
        if rc < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return rc

    return call
