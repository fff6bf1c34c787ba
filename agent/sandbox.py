"""The unprivileged parent's sandbox (see SECURITY.md).

Installed after the privilege drop, once everything is imported and opened.
"""

from __future__ import annotations


def confine_parent(device_fd: int) -> None:
    """Placeholder until the seccomp filter and Capsicum land (issue: hardening)."""
