"""What both kernel protocols have in common, once decoded."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Operation(enum.Enum):
    CHECK = "check"
    FREEZE = "freeze"
    THAW = "thaw"
    OTHER = "other"  # anything else the kernel sends: answered, and logged


@dataclass(frozen=True, slots=True)
class KernelRequest:
    op: Operation
    code: int  # the operation number exactly as the kernel sent it
    raw: bytes  # the whole request, for replies that must echo it
    msgid: int = 0  # FreeBSD transaction id (Linux has none)


class KernelProtocolError(Exception):
    """The kernel side sent something that is not a valid message."""
