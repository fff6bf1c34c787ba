"""The root child's system-call sandbox (see SECURITY.md).

Installed after start-up work (config read, crash recovery, first mount scan)
and before the first request is read.
"""

from __future__ import annotations


def confine_child() -> None:
    """Placeholder until the seccomp filter lands (issue: hardening)."""
