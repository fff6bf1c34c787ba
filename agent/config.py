"""The configuration file, as the parent reads it (TOML, root-owned).

The child's sections ([freeze], [check], [watchdog], [state]) are parsed with
privileged.config, the same code the child runs, so both agree; the parent's
own sections are parsed here.  Every mistake is one line naming the file, the
section and the key.  An example with every key: etc/hv-vss-agent.toml.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from agent.platforms import CONFIG_PATH, NATIVE_PROTOCOL, SYSLOG_SOCKET
from privileged.config import (
    CHILD_SECTIONS,
    ChildConfig,
    ConfigError,
    Section,
    parse_child_sections,
    read_toml,
)

LINUX_DEVICE = "/dev/vmbus/hv_vss"
FREEBSD_DEVICE = "/dev/hv_fsvss_dev"


@dataclass(frozen=True)
class NotifyConfig:
    socket: str | None = None  # no socket: no subscribers
    allow_users: tuple[str, ...] = ()
    allow_groups: tuple[str, ...] = ()
    timeout: float = 10.0  # per subscriber, for each event
    policy: str = "fail"  # "fail" | "skip"
    budget: float = 12.0  # whole transaction, below FreeBSD's 15 s chain timeout


@dataclass(frozen=True)
class ControlConfig:
    socket: str | None = None
    admin_group: str | None = None


@dataclass(frozen=True)
class MetricsConfig:
    dir: str | None = None
    interval: float = 30.0  # rewritten at least this often, except while frozen


@dataclass(frozen=True)
class AgentConfig:
    path: str | None = None
    user: str = "hvvss"
    chroot: str = "/var/empty"
    device: str | None = None
    protocol: str = NATIVE_PROTOCOL
    kernel_timeout: float = 15.0  # FreeBSD TIMEOUT_LIMIT: the kernel's wait for the chain
    log_target: str = "syslog"
    syslog_socket: str = SYSLOG_SOCKET
    log_buffer: int = 10000
    history: int = 50
    child: ChildConfig = field(default_factory=ChildConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    text: str | None = field(default=None, repr=False, compare=False)  # the file as root read it

    @property
    def device_path(self) -> str:
        if self.device:
            return self.device
        return FREEBSD_DEVICE if self.protocol == "freebsd" else LINUX_DEVICE


PARENT_SECTIONS = ("agent", "device", "log", "notify", "control", "metrics")


def parse(doc: Mapping[str, Any], path: str | None) -> AgentConfig:
    unknown = sorted(set(doc) - set(PARENT_SECTIONS) - set(CHILD_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}]")
    child = parse_child_sections(doc)

    a = Section("agent", doc.get("agent"))
    user = a.string("user", "hvvss")
    chroot = a.path("chroot", "/var/empty")
    history = a.integer("history", 50, 1, 10000)
    a.done()

    d = Section("device", doc.get("device"))
    device = d.optional_path("path")
    protocol = d.choice("protocol", NATIVE_PROTOCOL, ("linux", "freebsd"))
    kernel_timeout = d.number("kernel_timeout", 15.0, 1.0, 3600.0)
    d.done()

    lg = Section("log", doc.get("log"))
    log_target = lg.choice("target", "syslog", ("syslog", "stderr"))
    log_buffer = lg.integer("buffer", 10000, 10, 1_000_000)
    syslog_socket = lg.path("syslog_socket", SYSLOG_SOCKET)
    lg.done()

    n = Section("notify", doc.get("notify"))
    notify = NotifyConfig(
        socket=n.optional_path("socket"),
        allow_users=n.strings("allow_users"),
        allow_groups=n.strings("allow_groups"),
        timeout=n.number("timeout", 10.0, 0.1, 600.0),
        policy=n.choice("policy", "fail", ("fail", "skip")),
        budget=n.number("budget", 12.0, 0.5, 600.0),
    )
    n.done()

    c = Section("control", doc.get("control"))
    control = ControlConfig(socket=c.optional_path("socket"),
                            admin_group=c.string("admin_group", "") or None)
    c.done()

    m = Section("metrics", doc.get("metrics"))
    metrics = MetricsConfig(dir=m.optional_path("dir"),
                            interval=m.number("interval", 30.0, 1.0, 3600.0))
    m.done()

    return AgentConfig(path=path, user=user, chroot=chroot, device=device, protocol=protocol,
                       kernel_timeout=kernel_timeout,
                       log_target=log_target, syslog_socket=syslog_socket,
                       log_buffer=log_buffer, history=history,
                       child=child, notify=notify, control=control, metrics=metrics)


def load(path: str | None) -> AgentConfig:
    """Load `path`; None means the default path if it exists, else built-in defaults."""
    if path is None:
        if not os.path.exists(CONFIG_PATH):
            return AgentConfig()
        path = CONFIG_PATH
    path = os.path.abspath(path)  # the child, started in /, must read this very file
    doc, text = read_toml(path)
    try:
        return replace(parse(doc, path), text=text)
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
