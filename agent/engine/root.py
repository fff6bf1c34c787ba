"""The parent's root phase: what needs root, and nothing else.

A reviewer reads this module and the few it imports to know everything the
parent does as root (tools/root_loc.py counts them, from outside).  Its
interpreter starts with -I -S (agent/__main__.py), so no PYTHON* variable, no
user site and no .pth file has run; sys.path is the standard library.

  1. the install check, the account and the chroot directory, the sockets'
     directories (all refused before anything starts)
  2. logging, and detaching when not in the foreground
  3. open the kernel device (wait if it is not there yet; EBUSY is fatal)
  4. the frontend's listening sockets and its socketpair; the metrics directory
  5. start the root child (fresh interpreter, one socket)
  6. become the unprivileged account, keeping CAP_SYS_CHROOT alone (Linux)
Then the rest of the parent is imported, unprivileged, and agent/engine/daemon.py
waits for the child's HELLO, speaks the kernel protocol over the descriptor
opened here, enters the chroot, drops that last capability, starts the
frontend and serves: no codec of the child's wire or of the kernel's runs as
root.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import socket
import stat
import sys
import time
from dataclasses import dataclass, field

from agent import platforms
from agent.allowlist import Allowlist, group_id
from agent.config import AgentConfig
from agent.engine import child_start, logs, privdrop
from agent.engine.integrity import absent_reason, check_install, site_packages
from agent.engine.listeners import Access, listen_unix, trusted_directory
from agent.engine.metrics_dir import open_metrics_dir
from agent.errors import StartupError
from agent.kernel.opening import check_opened
from privileged.config import ConfigError
from privileged.device import open_device
from privileged.trust import untrusted_reason

log = logging.getLogger("hv-vss-agent")
# The standard library the unprivileged parent needs beyond what root has loaded,
# imported while root can still read it: an interpreter may keep its library where
# only root can (pyenv under /root).  Standard modules only, as the child loads them.
STDLIB_AFTER_DROP = ("json", "multiprocessing.connection", "multiprocessing.popen_fork",
                     "multiprocessing.queues", "multiprocessing.reduction",
                     "multiprocessing.synchronize", "resource")
HINT_AFTER = 5.0  # seconds without the kernel device before saying what is probably wrong


@dataclass
class Prepared:
    """What root made for the unprivileged parent."""

    cfg: AgentConfig
    device_fd: int  # the kernel device, its open seen to succeed (agent/kernel/opening.py)
    account: privdrop.Account | None
    chroot_fd: int | None
    child: child_start.Started = field(init=False)  # started last (its HELLO: daemon.py)
    metrics_fd: int | None = None
    # The frontend's: only with [notify] or [control] sockets.
    engine_end: socket.socket | None = None
    frontend_end: socket.socket | None = None
    notify: socket.socket | None = None
    control: socket.socket | None = None
    allow: Allowlist | None = None
    admin_gid: int | None = None


def run(cfg: AgentConfig, foreground: bool, debug: bool, in_memory: bool = False, *,
        simulator_may_freeze_all: bool = False) -> int:
    """Start as root, drop, serve.  `in_memory` is the unprivileged demo: no root, no split."""
    if in_memory and os.geteuid() == 0:
        raise StartupError("--in-memory is only for unprivileged demos")
    if cfg.log_target == "stderr" and not foreground:
        raise StartupError('[log] target = "stderr" needs -n: detached, stderr is /dev/null')
    if not in_memory and os.geteuid() != 0:
        raise StartupError("must be started as root (it starts the root child, then drops "
                           "privileges itself); try --simulate for the demo")
    freeze_all_ok = in_memory or simulator_may_freeze_all  # in memory nothing freezes
    refuse_simulator_freezing_all(cfg, _is_socket(cfg.device_path), freeze_all_ok)
    check_install(cfg.path)
    check_socket_directories(cfg)
    account = None if in_memory else privdrop.lookup_account(cfg.user)
    chroot_fd = privdrop.open_chroot(cfg.chroot) if account is not None else None
    start_logging(cfg, foreground, debug)
    if not foreground:
        daemonize()
    try:
        return _open_start_drop(cfg, debug, in_memory, account, chroot_fd,
                                freeze_all_ok=freeze_all_ok)
    except (ConfigError, StartupError, privdrop.DropError) as e:
        if not foreground:  # detached: stderr is /dev/null, the log is all there is
            log.error("%s", e)
        raise


def _open_start_drop(cfg: AgentConfig, debug: bool, in_memory: bool,
                     account: privdrop.Account | None, chroot_fd: int | None, *,
                     freeze_all_ok: bool) -> int:
    check_device_path(cfg.device_path)
    device_fd = wait_for_device(cfg.device_path, cfg.protocol)
    _refuse_opened_simulator(cfg, device_fd, freeze_all_ok)
    prep = Prepared(cfg, device_fd, account, chroot_fd)
    if cfg.notify.socket or cfg.control.socket:
        prepare_frontend(prep)
    if cfg.metrics.dir:
        prep.metrics_fd = open_metrics_dir(cfg.metrics.dir)
    for name in STDLIB_AFTER_DROP:
        importlib.import_module(name)
    # The child last: nothing root does after it can fail but the drop.
    prep.child = child_start.start(cfg.path, cfg.device_path, debug,
                                   extra=("--memory",) if in_memory else ())
    try:
        if account is not None and platforms.linux():
            privdrop.become(account)
        # Unprivileged from here on Linux (FreeBSD drops in daemon.py, before Capsicum).
        sys.path.extend(site_packages())
        from agent.engine import daemon

        return daemon.run(prep)
    except BaseException:
        prep.child.end()  # it sees EOF and exits (thawing, were anything frozen) first
        raise


def refuse_simulator_freezing_all(cfg: AgentConfig, is_socket: bool,
                                  allowed: bool = False) -> None:
    """A simulator is for trying the agent: with no [freeze] only, its FREEZE would
    freeze every filesystem of the machine it runs on, / included."""
    if is_socket and not cfg.child.freeze.only and not allowed:
        raise StartupError(f"{cfg.device_path} is a simulator's socket and the config has no "
                           "[freeze] only, so a simulated FREEZE would freeze every filesystem "
                           "here, / included: list scratch filesystems in [freeze] only, or "
                           "pass --simulator-may-freeze-all")


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False  # not there yet: asked again once it is open


def _refuse_opened_simulator(cfg: AgentConfig, fd: int, allowed: bool) -> None:
    """The same refusal, for a device that appeared as a socket while we waited."""
    try:
        refuse_simulator_freezing_all(cfg, stat.S_ISSOCK(os.fstat(fd).st_mode), allowed)
    except StartupError:
        os.close(fd)
        raise


def check_socket_directories(cfg: AgentConfig) -> None:
    """Refuse untrusted socket directories before anything starts (listen_unix checks again)."""
    for path, what in ((cfg.notify.socket, "[notify] socket"),
                       (cfg.control.socket, "[control] socket")):
        if path:
            trusted_directory(path, what)


def start_logging(cfg: AgentConfig, foreground: bool, debug: bool) -> None:
    try:
        logs.setup("stderr" if foreground else cfg.log_target, debug, cfg.syslog_socket)
    except OSError as e:
        raise StartupError(f"cannot log to syslog at {cfg.syslog_socket} ({e.strerror}): "
                           "set [log] syslog_socket, or run with -n") from None


def daemonize() -> None:
    """Detach like daemon(3): fork, setsid, fork, stdio on /dev/null, cwd /."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def check_device_path(path: str) -> None:
    """StrictModes for the device: root's, and nobody else could put another in its place
    (if it is not there yet, nobody else could create it)."""
    reason = untrusted_reason(path) if os.path.lexists(path) else absent_reason(path)
    if reason:
        raise StartupError(f"refusing the device {path}: {reason}")


def wait_for_device(path: str, protocol: str, backoff_max: float = 5.0) -> int:
    """Open the device; if it does not exist yet, wait for it (bounded backoff).

    The device may appear after we start (devd and udev start us on its
    creation, and systemd may start us before hv_utils is loaded), so a missing
    device is waited for; after HINT_AFTER seconds one warning says what is
    probably wrong.

    Over the simulator's socket, open(2)'s result arrives as the first record:
    it is read here too, so that a busy device (a second daemon) is refused
    before the child starts; a child started regardless would first run crash
    recovery, and could thaw the other daemon's freeze."""
    delay, said, hinted = 0.1, False, False
    since = time.monotonic()
    while True:
        try:
            fd = open_device(path)
            check_opened(fd)
            return fd
        except FileNotFoundError:
            if not said:
                log.info("waiting for %s to appear", path)
                said = True
            if not hinted and time.monotonic() - since >= HINT_AFTER:
                log.warning("%s", missing_device_hint(path, protocol, HINT_AFTER))
                hinted = True
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise StartupError(f"{path} is busy: another VSS daemon has it open "
                                   "(stop hv_vss_daemon first)") from None
            raise StartupError(f"cannot open {path}: {e.strerror or e}") from None
        time.sleep(delay)
        delay = min(delay * 2, backoff_max)


def missing_device_hint(path: str, protocol: str, after: float) -> str:
    gone = f"{path} still does not exist after {after:.0f} s"
    if not path.startswith("/dev/"):
        return (f"{gone}: nothing serves it; if it is a simulator's socket, start the "
                "simulator (the agent keeps trying)")
    if protocol == "freebsd":
        return (f"{gone}: this is probably not a Hyper-V guest, or the hv_vss driver is not "
                "attached (hv_utils(4)), or the VM's Backup (volume shadow copy) integration "
                "service is off (the agent keeps trying)")
    return (f"{gone}: this is probably not a Hyper-V guest, or the hv_utils module is not "
            "loaded (modprobe hv_utils), or the VM's Backup (volume shadow copy) integration "
            "service is off (the agent keeps trying)")


def prepare_frontend(prep: Prepared) -> None:
    """The frontend's sockets, made while we still can (in root-only directories)."""
    cfg = prep.cfg
    prep.allow = allow = Allowlist.from_names(cfg.notify.allow_users, cfg.notify.allow_groups,
                                              "[notify]")
    prep.admin_gid = group_id(cfg.control.admin_group, "[control] admin_group") \
        if cfg.control.admin_group else None
    # The kernel lets in only who may connect (engine/listeners.py); the frontend checks again.
    if cfg.notify.socket:
        prep.notify = listen_unix(cfg.notify.socket, Access.for_allowlist(allow),
                                  "[notify] socket")
    if cfg.control.socket:
        prep.control = listen_unix(cfg.control.socket, Access(group=prep.admin_gid),
                                   "[control] socket")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    for s in (ours, theirs):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    prep.engine_end, prep.frontend_end = ours, theirs
