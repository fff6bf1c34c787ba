"""Start-up, as root, in the order the design fixes; then serve unprivileged.

Everything the parent will ever run is imported at the top of this module:
after the chroot there is nothing left to import from.

  1. config (parsed and validated by the caller), install integrity checks
  2. open the kernel device (wait if it is not there yet; EBUSY is fatal)
  3. start the root child (fresh interpreter, one socket) and wait for HELLO
  4. drop privileges (chroot, groups, gids, uids, verified, no new privileges)
  5. register with the kernel and serve
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import time

from agent import logs, privdrop
from agent.child_link import ChildGone, ChildLink
from agent.config import AgentConfig
from agent.engine import Engine, NotifyPolicy
from agent.errors import StartupError
from agent.integrity import check_install
from agent.kernel.transport import (
    Endpoint,
    KernelChannel,
    KernelLost,
    KernelProtocolError,
    attach,
)
from agent.sandbox import confine_parent
from agent.service import Service
from privileged.device import open_device

log = logging.getLogger("hv-vss-agent")

EXIT_STARTUP = 1


def wait_for_device(path: str, protocol: str, backoff_max: float = 5.0) -> Endpoint:
    """Open the device; if it does not exist yet, wait for it (bounded backoff).

    Over the simulator's socket, open(2)'s result arrives as the first record:
    it is read here too, so that a busy device (a second daemon) is refused
    before the child starts; a child started regardless would first run crash
    recovery, and could thaw the other daemon's freeze."""
    delay, said = 0.1, False
    while True:
        try:
            return attach(open_device(path), protocol)
        except FileNotFoundError:
            if not said:
                log.info("waiting for %s to appear", path)
                said = True
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise StartupError(f"{path} is busy: another VSS daemon has it open "
                                   "(stop hv_vss_daemon first)") from None
            raise StartupError(f"cannot open {path}: {e.strerror or e}") from None
        time.sleep(delay)
        delay = min(delay * 2, backoff_max)


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


def run(cfg: AgentConfig, foreground: bool, debug: bool, in_memory: bool = False) -> int:
    """Start and serve.  `in_memory` is the unprivileged demo: no root, no split."""
    if in_memory and os.geteuid() == 0:
        raise StartupError("--in-memory is only for unprivileged demos")
    if not in_memory and os.geteuid() != 0:
        raise StartupError("must be started as root (it starts the root child, then drops "
                           "privileges itself); try --simulate for the demo")
    check_install(cfg.path)
    account = None if in_memory else privdrop.lookup_account(cfg.user)
    if account is not None:
        privdrop.check_chroot(cfg.chroot)
    try:
        gate = logs.setup("stderr" if foreground else cfg.log_target, debug, cfg.log_buffer,
                          cfg.syslog_socket)
    except OSError as e:
        raise StartupError(f"cannot log to syslog at {cfg.syslog_socket} ({e.strerror}): "
                           "set [log] syslog_socket, or run with -n") from None
    if not foreground:
        daemonize()

    endpoint = wait_for_device(cfg.device_path, cfg.protocol)
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

    if account is not None:
        privdrop.drop(account, cfg.chroot)
        log.info("running as %s (uid %d, gid %d), chrooted to %s", account.name, account.uid,
                 account.gid, cfg.chroot)
        confine_parent(endpoint.fileno())

    kernel = register(endpoint, cfg.protocol)
    engine = Engine(cfg.protocol, NotifyPolicy(enabled=False, budget=cfg.notify.budget,
                                               policy=cfg.notify.policy), cfg.history)
    service = Service(engine, child, gate, protocol=cfg.protocol, kernel=kernel,
                      kernel_timeout=cfg.kernel_timeout)
    service.install_signals()
    code = service.run()
    logging.shutdown()
    sys.stderr.flush()
    return code
