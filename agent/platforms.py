"""Which system the unprivileged side runs on, and what follows from it: asked here only
(the root child asks for itself, as it imports nothing from agent/).  Functions, so that
a test can pose as FreeBSD by setting sys.platform; the defaults are fixed at import."""

import sys


def freebsd() -> bool:
    return sys.platform.startswith("freebsd")


def linux() -> bool:
    return sys.platform.startswith("linux")


NATIVE_PROTOCOL = "freebsd" if freebsd() else "linux"
SYSLOG_SOCKET = "/var/run/log" if freebsd() else "/dev/log"
CONFIG_PATH = "/usr/local/etc/hv-vss-agent.toml" if freebsd() else "/etc/hv-vss-agent.toml"
