"""Start-up, as root, in the order the design fixes; then serve unprivileged.

Everything the parent will ever run is imported at the top of this module:
after the chroot there is nothing left to import from.

  1. config (parsed and validated by the caller), install integrity checks
  2. open the kernel device (wait if it is not there yet; EBUSY is fatal)
  3. start the root child (fresh interpreter, one socket) and wait for HELLO
  4. if there are subscribers or a control socket: the fork start method,
     multiprocessing-logging's handler (its queue needs /dev/shm, gone after
     the chroot), the frontend's sockets and the engine <-> frontend
     socketpair; the metrics directory
  5. drop privileges (chroot, groups, gids, uids, verified, no new privileges)
  6. fork the frontend (unprivileged from its first instruction; no record
     crosses the logging queue from it before the engine has dropped root)
  7. register with the kernel and serve
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import sys
import time

from agent import mp_logging
from agent.config import AgentConfig
from agent.engine import logs, privdrop
from agent.engine.child_link import ChildGone, ChildLink
from agent.engine.frontend_link import FrontendLink
from agent.engine.integrity import absent_reason, check_install
from agent.engine.listeners import Access, listen_unix, trusted_directory
from agent.engine.machine import Engine, NotifyPolicy
from agent.engine.metrics import MetricsWriter, open_metrics_dir, render
from agent.engine.service import Service
from agent.engine.status import Rendered, snapshot
from agent.errors import StartupError
from agent.frontend import main as frontend
from agent.kernel.transport import (
    Endpoint,
    KernelChannel,
    KernelLost,
    KernelProtocolError,
    SocketEndpoint,
    attach,
)
from agent.peercred import Allowlist, group_id
from agent.sandbox import SandboxError, confine_parent, parent_roles
from privileged.child import pick_freezer
from privileged.device import open_device
from privileged.selection import select_targets
from privileged.trust import untrusted_reason

log = logging.getLogger("hv-vss-agent")

EXIT_STARTUP = 1
HINT_AFTER = 5.0  # seconds without the kernel device before saying what is probably wrong


def wait_for_device(path: str, protocol: str, backoff_max: float = 5.0) -> Endpoint:
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
            return attach(open_device(path), protocol)
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


def check_device_path(path: str) -> None:
    """StrictModes for the device: root's, and nobody else could put another in its place
    (if it is not there yet, nobody else could create it)."""
    reason = untrusted_reason(path) if os.path.lexists(path) else absent_reason(path)
    if reason:
        raise StartupError(f"refusing the device {path}: {reason}")


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


def register(endpoint: Endpoint, protocol: str) -> KernelChannel:
    try:
        kernel = KernelChannel(endpoint, protocol)
        modver = kernel.register()
    except (KernelLost, KernelProtocolError) as e:
        raise StartupError(f"registration with the kernel failed: {e}") from None
    if modver is not None:
        log.info("registered with the kernel (kernel_modver %d)", modver)
    else:  # FreeBSD's hv_vss_dev_open registers the opener: there is no handshake
        log.info("registered with the kernel (by opening the device)")
    return kernel


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


def _refuse_opened_simulator(cfg: AgentConfig, endpoint: Endpoint, allowed: bool,
                             foreground: bool) -> None:
    """The same refusal, for a device that appeared as a socket while we waited."""
    try:
        refuse_simulator_freezing_all(cfg, isinstance(endpoint, SocketEndpoint), allowed)
    except StartupError as e:
        endpoint.close()
        if not foreground:  # detached: stderr is /dev/null, the log is all there is
            log.error("%s", e)
        raise


def run(cfg: AgentConfig, foreground: bool, debug: bool, in_memory: bool = False, *,
        simulator_may_freeze_all: bool = False) -> int:
    """Start and serve.  `in_memory` is the unprivileged demo: no root, no split."""
    if in_memory and os.geteuid() == 0:
        raise StartupError("--in-memory is only for unprivileged demos")
    if not in_memory and os.geteuid() != 0:
        raise StartupError("must be started as root (it starts the root child, then drops "
                           "privileges itself); try --simulate for the demo")
    freeze_all_ok = in_memory or simulator_may_freeze_all  # in memory nothing freezes
    refuse_simulator_freezing_all(cfg, _is_socket(cfg.device_path), freeze_all_ok)
    check_install(cfg.path)
    check_socket_directories(cfg)
    account = None if in_memory else privdrop.lookup_account(cfg.user)
    if account is not None:
        privdrop.check_chroot(cfg.chroot)
    gate = start_logging(cfg, foreground, debug)
    if not foreground:
        daemonize()

    check_device_path(cfg.device_path)
    endpoint = wait_for_device(cfg.device_path, cfg.protocol)
    _refuse_opened_simulator(cfg, endpoint, freeze_all_ok, foreground)
    child = start_child(cfg, debug, in_memory)
    plan, engine_end = prepare_frontend(cfg)
    metrics_fd = None
    if cfg.metrics.dir:
        metrics_fd = open_metrics_dir(cfg.metrics.dir, account.uid if account else None,
                                      account.gid if account else None,
                                      selected_devices(cfg, in_memory))

    if account is not None:
        privdrop.drop(account, cfg.chroot)
        log.info("running as %s (uid %d, gid %d), chrooted to %s", account.name, account.uid,
                 account.gid, cfg.chroot)
    link = None
    if plan is not None and engine_end is not None:
        closers = [child.close, endpoint.close]  # the frontend holds neither
        if metrics_fd is not None:
            closers.append(lambda: os.close(metrics_fd))
        link = FrontendLink(engine_end, frontend.start(plan, engine_end, closers))
        log.info("frontend %d started:%s%s", link.pid,
                 f" subscribers on {cfg.notify.socket}" if cfg.notify.socket else "",
                 f" control on {cfg.control.socket}" if cfg.control.socket else "")
    if account is not None:
        try:
            confine_parent(endpoint.fileno(), parent_roles(frontend=link is not None,
                                                           metrics=metrics_fd is not None))
        except SandboxError as e:
            raise StartupError(f"cannot sandbox the parent: {e.strerror or e}") from None
    return serve(cfg, register(endpoint, cfg.protocol), child, gate, link=link,
                 metrics_fd=metrics_fd)


def start_logging(cfg: AgentConfig, foreground: bool, debug: bool) -> logs.FreezeGate:
    try:
        return logs.setup("stderr" if foreground else cfg.log_target, debug, cfg.log_buffer,
                          cfg.syslog_socket)
    except OSError as e:
        raise StartupError(f"cannot log to syslog at {cfg.syslog_socket} ({e.strerror}): "
                           "set [log] syslog_socket, or run with -n") from None


def start_child(cfg: AgentConfig, debug: bool, in_memory: bool) -> ChildLink:
    child = ChildLink.spawn(cfg.path, cfg.device_path, debug,
                            extra=("--memory",) if in_memory else ())
    try:
        hello = child.wait_hello()
    except ChildGone as e:
        status = child.exit_status(2.0)
        raise StartupError(f"the root child failed to start ({e}; exit status {status})") \
            from None
    log.info("root child %d ready: %d filesystem(s) selected%s", hello.pid, hello.targets,
             f", {hello.recovered} recovered from a crash record" if hello.recovered else "")
    return child


def serve(cfg: AgentConfig, kernel: KernelChannel, child: ChildLink, gate: logs.FreezeGate, *,
          link: FrontendLink | None, metrics_fd: int | None) -> int:
    engine = Engine(cfg.protocol, NotifyPolicy(enabled=cfg.notify.socket is not None,
                                               budget=cfg.notify.budget,
                                               policy=cfg.notify.policy), cfg.history)
    service = Service(engine, child, gate, protocol=cfg.protocol, kernel=kernel, notifier=link,
                      kernel_timeout=cfg.kernel_timeout)
    publisher = Publisher(service, link,
                          MetricsWriter(metrics_fd) if metrics_fd is not None else None,
                          cfg.child.watchdog.max_frozen_seconds)
    service.on_change = publisher
    if metrics_fd is not None:
        service.before_freeze = publisher.before_freeze
        service.refresh_every = cfg.metrics.interval
    service.install_signals()
    try:
        code = service.run()
    finally:
        if link is not None:
            link.close()
    publisher.stopped()
    logging.shutdown()
    sys.stderr.flush()
    return code


def check_socket_directories(cfg: AgentConfig) -> None:
    """Refuse untrusted socket directories before anything starts (listen_unix checks again)."""
    for path, what in ((cfg.notify.socket, "[notify] socket"),
                       (cfg.control.socket, "[control] socket")):
        if path:
            trusted_directory(path, what)


def prepare_frontend(cfg: AgentConfig) -> tuple[frontend.Plan | None, socket.socket | None]:
    """Root, before the drop: everything the frontend will need, made while we still can."""
    if not cfg.notify.socket and not cfg.control.socket:
        return None, None
    mp_logging.install()
    allow = Allowlist.from_names(cfg.notify.allow_users, cfg.notify.allow_groups, "[notify]")
    admin_gid = group_id(cfg.control.admin_group, "[control] admin_group") \
        if cfg.control.admin_group else None
    # The kernel lets in only who may connect (engine/listeners.py); the frontend checks again.
    notify = listen_unix(cfg.notify.socket, Access.for_allowlist(allow), "[notify] socket") \
        if cfg.notify.socket else None
    control = listen_unix(cfg.control.socket, Access(group=admin_gid), "[control] socket") \
        if cfg.control.socket else None
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    for s in (ours, theirs):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return frontend.Plan(theirs, notify, control, allow, admin_gid, cfg.notify.timeout), ours


def selected_devices(cfg: AgentConfig, in_memory: bool) -> dict[int, str]:
    """The filesystems the child would freeze now, by device number (root, before the drop)."""
    if in_memory:
        return {}
    freezer = pick_freezer()
    devices = {}
    for m in select_targets(freezer.mounts(), cfg.child, freezer.platform).targets:
        with contextlib.suppress(OSError):
            devices[os.stat(m.mountpoint).st_dev] = m.mountpoint
    return devices


class Publisher:
    """After every change: the status to the frontend, the metrics file when it is safe.

    Safe means that nothing is frozen: the metrics directory is on no filesystem the
    child selected at start, but mounts change, so a frozen one is never risked."""

    def __init__(self, service: Service, link: FrontendLink | None,
                 metrics: MetricsWriter | None, max_frozen: float | None = None) -> None:
        self.service, self.link, self.metrics = service, link, metrics
        self.max_frozen = max_frozen
        self.metrics_error = ""
        self.rendered = Rendered()

    def status(self) -> dict[str, object]:
        return snapshot(self.service, self.link.pid if self.link else None, self.max_frozen,
                        self.rendered)

    def __call__(self) -> None:
        status = self.status()
        if self.link is not None:
            self.link.publish(status)
        engine = self.service.engine
        if engine.frozen or engine.busy or self.service.pending_child is not None:
            return  # never while anything is frozen or about to be
        self._write(render(status))

    def before_freeze(self) -> None:
        """The engine is about to ask the child to freeze: nothing is frozen yet, and
        the file will not be written again until the thaw, so it says frozen now."""
        self._write(render(self.status(), frozen=True))

    def stopped(self) -> None:
        if not self.service.left_frozen:
            self._write(render(self.status(), up=False))

    def _write(self, text: str) -> None:
        if self.metrics is None:
            return
        try:
            self.metrics.write(text)
            self.metrics_error = ""
        except OSError as e:
            if e.strerror != self.metrics_error:
                log.warning("cannot write the metrics file: %s", e.strerror)
            self.metrics_error = e.strerror or str(e)
