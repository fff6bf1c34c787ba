"""What both kernel protocols have in common, once decoded."""

from __future__ import annotations

from dataclasses import dataclass

from agent.protocols.verb import Verb


@dataclass(frozen=True, slots=True)
class KernelRequest:
    op: Verb | None  # None: an operation the agent does not know (answered, and logged)
    code: int  # the operation number exactly as the kernel sent it
    raw: bytes  # the whole request, for replies that must echo it
    msgid: int = 0  # FreeBSD transaction id (Linux has none)


class KernelProtocolError(Exception):
    """The kernel side sent something that is not a valid message."""
