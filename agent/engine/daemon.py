"""The parent once root is gone: the chroot, the frontend, the sandbox, serving.

agent/engine/root.py has done everything that needs root and become the
unprivileged account (on Linux it kept CAP_SYS_CHROOT alone).  This module,
and everything it imports, is loaded by that account; after the chroot there
is nothing left to import from, so everything the parent will ever run is
imported at the top of this module.

  0. the config read again, with the child's TOML reader; the log stream
     behind the freeze gate; the child's HELLO; the kernel device wrapped for
     its protocol
  1. the metrics directory must not be on a filesystem the child freezes
  2. if there are subscribers or a control socket: multiprocessing-logging's
     queue (it needs /dev/shm, gone after the chroot)
  3. the chroot; the last capability goes (Linux); on FreeBSD the whole drop
  4. fork the frontend (unprivileged from its first instruction)
  5. the parent's sandbox; register with the kernel and serve
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tomllib

from agent import mp_logging, platforms
from agent.config import AgentConfig
from agent.engine import chroot, freeze_gate
from agent.engine.child_link import ChildGone, ChildLink
from agent.engine.freeze_gate import FreezeGate
from agent.engine.frontend_link import FrontendLink
from agent.engine.machine import Engine, NotifyPolicy
from agent.engine.metrics import MetricsWriter, render
from agent.engine.metrics_dir import check_metrics_dir
from agent.engine.root import Prepared
from agent.engine.service import Service
from agent.engine.status import Rendered, snapshot
from agent.errors import StartupError
from agent.frontend import main as frontend
from agent.kernel.channel import KernelChannel, KernelLost, KernelProtocolError
from agent.kernel.protocol import PROTOCOLS, KernelProtocol
from agent.kernel.transport import Endpoint, wrap
from agent.sandbox import SandboxError, confine_parent, parent_roles
from privileged import wire
from privileged.config import ConfigError
from privileged.toml_subset import parse_toml

log = logging.getLogger("hv-vss-agent")


def run(prep: Prepared) -> int:
    cfg, account = prep.cfg, prep.account
    refuse_what_the_child_reads_differently(cfg)
    gate = freeze_gate.install(cfg.log_buffer)
    child = ChildLink(prep.child.sock, prep.child.proc)
    wait_for_child(child)
    endpoint = wrap(prep.device_fd, cfg.protocol)
    if prep.metrics_fd is not None and cfg.metrics.dir:
        check_metrics_dir(prep.metrics_fd, cfg.metrics.dir, account.uid if account else None,
                          account.gid if account else None,
                          selected_devices(child.hello, cfg.metrics.dir))
    if prep.engine_end is not None:
        mp_logging.install()
    if account is not None and prep.chroot_fd is not None:
        if platforms.linux():
            chroot.enter_chroot(prep.chroot_fd, cfg.chroot)
        else:
            os.close(prep.chroot_fd)
            chroot.drop(account, cfg.chroot)
        log.info("running as %s (uid %d, gid %d), chrooted to %s", account.name, account.uid,
                 account.gid, cfg.chroot)
    mp_logging.start_receivers()
    link = None
    if prep.engine_end is not None and prep.frontend_end is not None and prep.allow is not None:
        plan = frontend.Plan(prep.frontend_end, prep.notify, prep.control, prep.allow,
                             prep.admin_gid, cfg.notify.timeout)
        closers = [child.close, endpoint.close]  # the frontend holds neither
        metrics_fd = prep.metrics_fd
        if metrics_fd is not None:
            closers.append(lambda: os.close(metrics_fd))
        link = FrontendLink(prep.engine_end, frontend.start(plan, prep.engine_end, closers))
        log.info("frontend %d started:%s%s", link.pid,
                 f" subscribers on {cfg.notify.socket}" if cfg.notify.socket else "",
                 f" control on {cfg.control.socket}" if cfg.control.socket else "")
    if account is not None:
        try:
            confine_parent(endpoint.fileno(), parent_roles(frontend=link is not None,
                                                           metrics=prep.metrics_fd is not None))
        except SandboxError as e:
            raise StartupError(f"cannot sandbox the parent: {e.strerror or e}") from None
    return serve(cfg, register(endpoint, PROTOCOLS[cfg.protocol]), child, gate, link=link,
                 metrics_fd=prep.metrics_fd)


def refuse_what_the_child_reads_differently(cfg: AgentConfig) -> None:
    """Root read the file with tomllib; the child reads it with its own reader.  Should
    the two readings ever differ (tests/test_fuzz_parsers.py says they do not), or the
    child's reader not read the file at all, the agent stops here, before it serves, with
    the line."""
    if cfg.path and cfg.text is not None and \
            parse_toml(cfg.text, cfg.path) != tomllib.loads(cfg.text):
        raise ConfigError(f"config file {cfg.path}: the root child reads it differently")


def wait_for_child(child: ChildLink) -> None:
    try:
        hello = child.wait_hello()
    except ChildGone as e:
        status = child.exit_status(2.0)
        raise StartupError(f"the root child failed to start ({e}; exit status {status})") \
            from None
    log.info("root child %d ready: %d filesystem(s) selected%s", hello.pid, hello.targets,
             f", {hello.recovered} recovered from a crash record" if hello.recovered else "")


def register(endpoint: Endpoint, protocol: KernelProtocol) -> KernelChannel:
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


def serve(cfg: AgentConfig, kernel: KernelChannel, child: ChildLink, gate: FreezeGate, *,
          link: FrontendLink | None, metrics_fd: int | None) -> int:
    engine = Engine(kernel.protocol, NotifyPolicy(enabled=cfg.notify.socket is not None,
                                               budget=cfg.notify.budget,
                                               policy=cfg.notify.policy), cfg.history)
    service = Service(engine, child, gate, protocol=kernel.protocol, kernel=kernel, notifier=link,
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


def selected_devices(hello: wire.Hello | None, near: str) -> dict[int, str]:
    """The filesystems the root child selected, by device number (from its HELLO: the
    parent never selects), each named by the topmost directory above `near` on it,
    for the message."""
    named = {}
    for dev in hello.devices if hello else ():
        top = os.path.realpath(near)
        with contextlib.suppress(OSError):
            while top != "/" and os.stat(os.path.dirname(top)).st_dev == dev:
                top = os.path.dirname(top)
        named[dev] = top
    return named


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
