"""Logging for the unprivileged side: one stream, set up by root.

syslog by default (ident hv-vss-agent, facility daemon), stderr in the
foreground; connected as root, before the chroot.  Once root is gone the
stream is put behind the gate that holds it while frozen
(agent/engine/freeze_gate.py).
"""

from __future__ import annotations

import logging
import logging.handlers
import socket
import sys

IDENT = "hv-vss-agent"
FORMAT_STDERR = "%(asctime)s %(name)s[%(process)d] %(levelname)s: %(message)s"
FORMAT_SYSLOG = IDENT + "[%(process)d]: %(levelname)s: %(message)s"


def make_target(target: str, syslog_socket: str) -> logging.Handler:
    if target == "syslog":
        # Connected now, before the chroot: it cannot be reconnected from inside.
        # SysLogHandler ignores a failed connect and retries at each record, which
        # inside the chroot can never work: so try it ourselves first.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            probe.connect(syslog_socket)
        finally:
            probe.close()
        handler: logging.Handler = logging.handlers.SysLogHandler(
            syslog_socket, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter(FORMAT_SYSLOG))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT_STDERR))
    return handler


def setup(target: str, debug: bool, syslog_socket: str = "/dev/log") -> None:
    """Configure the root logger.  Raises OSError if syslog is asked for and cannot be
    reached."""
    root = logging.getLogger()
    root.handlers[:] = [make_target(target, syslog_socket)]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.raiseExceptions = False  # a failing handler must not disturb the service
