"""The host simulator: a driver model served on a Unix SOCK_SEQPACKET socket.

The agent connects to the socket exactly as it would open the device node
(`--device PATH`) and exchanges the same records.  The first record of every
connection is open(2)'s result as a 4-byte errno (see agent.kernel.transport),
because a socket cannot refuse a connection with EBUSY.  Where the real driver
would make the daemon's write fail, the simulator closes the connection, which
the daemon sees as a failed read or write, as it would on the device.

Two models: Linux's drivers/hv/hv_snapshot.c (12-byte read/write records,
linux_driver.py) and FreeBSD's hv_snapshot.c (64-byte ioctl structures, where
a READ is a record the simulator sends and a WRITE one it receives,
freebsd_driver.py).

A thread runs the I/O; the host side (tests, the demo, the benchmark) calls
request()/send()/wait() from its own thread.  Driver timeouts are parameters,
so tests can shorten them.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Protocol

from agent.simulator import freebsd_driver
from agent.simulator.host import OPS, HostRequest
from agent.simulator.linux_driver import LinuxDriver

OPEN_STATUS = struct.Struct("<i")


class Driver(Protocol):
    timer: float | None  # when the pending transaction times out

    @property
    def registered(self) -> bool: ...

    def open(self) -> int: ...
    def release(self, now: float) -> None: ...
    def write(self, data: bytes, now: float) -> int: ...
    def take_outmsg(self) -> bytes | None: ...
    def host_send(self, op: int, now: float) -> HostRequest: ...
    def tick(self, now: float) -> None: ...


def make_driver(protocol: str, **timeouts: float) -> tuple[Driver, dict[str, int]]:
    if protocol == "freebsd":
        unknown = sorted(set(timeouts) - {"chain_timeout"})
        if unknown:
            raise TypeError(f"the FreeBSD driver has no timeout {unknown[0]!r}")
        return freebsd_driver.FreeBSDDriver(timeouts.get("chain_timeout", 15.0)), OPS
    return LinuxDriver(**timeouts), OPS


class Simulator:
    def __init__(self, path: str, protocol: str = "linux", **timeouts: float) -> None:
        self.path = path
        self.protocol = protocol
        self.driver, self.ops = make_driver(protocol, **timeouts)
        self.cond = threading.Condition()
        self.conn: socket.socket | None = None
        self.connections = 0  # daemon connections accepted so far
        self.refused = 0  # connections refused (EBUSY)
        self.requests: list[HostRequest] = []
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._drop = False
        self.clock: Callable[[], float] = time.monotonic

    # --- lifecycle ------------------------------------------------------------

    def start(self) -> Simulator:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        lst.bind(self.path)
        os.chmod(self.path, 0o600)  # like the device node: root only
        lst.listen(8)
        self._listener = lst
        self._thread = threading.Thread(target=self._run, name="vss-simulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._wake()
        if self._thread:
            self._thread.join(5)
        with self.cond:
            self._close_conn()
        if self._listener:
            self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the host's side --------------------------------------------------------

    def send(self, op: str | int) -> HostRequest:
        code = self.ops[op] if isinstance(op, str) else op
        with self.cond:
            req = self.driver.host_send(code, self.clock())
            self.requests.append(req)
            self._flush()
        self._wake()
        return req

    def wait(self, req: HostRequest, timeout: float = 30.0) -> HostRequest:
        with self.cond:
            if not self.cond.wait_for(lambda: req.done, timeout):
                raise TimeoutError(f"no answer to host request {req.op} within {timeout} s")
        return req

    def request(self, op: str | int, timeout: float = 30.0) -> HostRequest:
        return self.wait(self.send(op), timeout)

    def registered(self) -> bool:
        with self.cond:
            return self.driver.registered

    def wait_registered(self, timeout: float = 10.0, connections: int = 1) -> None:
        with self.cond:
            if not self.cond.wait_for(
                lambda: self.driver.registered and self.connections >= connections, timeout):
                raise TimeoutError("the agent did not register with the simulator")

    def hibernate(self) -> None:
        """Linux only: hv_vss_pre_suspend's fake THAW."""
        with self.cond:
            self.driver.pre_suspend(self.clock())  # type: ignore[attr-defined]
            self._flush()
        self._wake()

    def drop_connection(self, timeout: float = 5.0) -> None:
        """Close the daemon's connection, as a failed read would look to it.

        The I/O thread closes it: closed from here while that thread sits in
        select() on it, the kernel would keep the socket alive until select
        returned, and the daemon would see no EOF."""
        with self.cond:
            self._drop = True
            self._wake()
            if not self.cond.wait_for(lambda: not self._drop, timeout):
                raise TimeoutError("the simulator did not drop the connection")

    def nothing_pending(self) -> None:
        """FreeBSD only: send what IOCHVVSSREAD returns when the request it was woken
        for has already timed out (status VSS_FAIL), a race the socket cannot produce
        by itself (see agent.simulator.freebsd_driver)."""
        if self.protocol != "freebsd":
            raise ValueError("only the FreeBSD driver has a READ that finds nothing")
        self.inject(freebsd_driver.NOTHING_PENDING)

    def inject(self, record: bytes) -> None:
        """Send a raw record to the daemon (fault injection)."""
        with self.cond:
            if self.conn is not None:
                self.conn.send(record)

    # --- the I/O thread ------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _run(self) -> None:
        assert self._listener is not None
        while not self._stopping:
            fds = [self._listener.fileno(), self._wake_r]
            with self.cond:
                if self.conn is not None:
                    fds.append(self.conn.fileno())
                deadline = self.driver.timer
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            ready, _, _ = select.select(fds, [], [], timeout)
            with self.cond:
                if self._wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                if self._drop:
                    self._close_conn()
                    self._drop = False
                if self._listener.fileno() in ready:
                    self._accept()
                if self.conn is not None and self.conn.fileno() in ready:
                    self._receive()
                self.driver.tick(self.clock())
                self._flush()
                self.cond.notify_all()

    def _accept(self) -> None:
        assert self._listener is not None
        s, _ = self._listener.accept()
        err = self.driver.open()
        if err:
            self.refused += 1
            with contextlib.suppress(OSError):
                s.send(OPEN_STATUS.pack(err))
            s.close()
            return
        s.send(OPEN_STATUS.pack(0))
        self.conn = s
        self.connections += 1

    def _receive(self) -> None:
        assert self.conn is not None
        try:
            data = self.conn.recv(4096)
        except OSError:
            data = b""
        if not data:
            self._close_conn()
            return
        if self.driver.write(data, self.clock()):
            self._close_conn()  # the real write() fails; the daemon resets the device

    def _flush(self) -> None:
        while self.conn is not None:
            msg = self.driver.take_outmsg()
            if msg is None:
                return
            try:
                self.conn.send(msg)
            except OSError:
                self._close_conn()

    def _close_conn(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
            self.driver.release(self.clock())
