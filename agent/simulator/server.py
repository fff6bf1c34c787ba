"""The host simulator: a driver model served on a Unix SOCK_SEQPACKET socket.

The agent connects to the socket as it would open the device node
(`--device PATH`) and makes its system calls on the device as records
(agent/simulator/wire.py): the simulator hands the driver each call when it
arrives and answers it when and as the driver returns from it.  A message
for the daemon is therefore taken when the daemon reads it, not when it is
ready; a read the driver would block stays unanswered until it would return;
a rejected write is an error answer, and the connection stays open.  The
simulator closes a connection only when told to (drop_connection, stop).

Two models: Linux's drivers/hv/hv_snapshot.c (12-byte read/write records,
linux_driver.py) and FreeBSD's hv_snapshot.c (64-byte ioctl structures,
freebsd_driver.py).

A thread runs the I/O; the host side (tests, the demo, the benchmark, the
`hv-vss-agent simulator` command) calls request()/send()/wait() from its own
thread.  Driver timeouts are parameters, so tests can shorten them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from agent.kernel import freebsd_wire
from agent.simulator import freebsd_driver, wire
from agent.simulator.host import OPS, HostRequest
from agent.simulator.linux_driver import LinuxDriver

OPEN_STATUS = wire.OPEN_STATUS


class Driver(Protocol):
    timer: float | None  # when the pending transaction times out
    readable: int  # what the driver's poll reports while a message waits
    log: list[str]

    @property
    def registered(self) -> bool: ...

    def open(self) -> int: ...
    def release(self, now: float) -> None: ...
    def d_poll(self, events: int) -> int: ...
    def d_read(self, count: int, now: float) -> tuple[int, bytes] | None: ...
    def d_write(self, data: bytes, now: float) -> int: ...
    def d_ioctl(self, cmd: int, arg: bytes, now: float) -> tuple[int, bytes]: ...
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
        #: Called, with the lock held, for what an operator watching the simulator
        #: wants to see: connections, registration, the driver's log lines.
        self.on_event: Callable[[str], None] | None = None
        self.clock: Callable[[], float] = time.monotonic
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._drop = False
        self._armed: int | None = None  # the events of the daemon's standing POLL
        self._waiting_read: int | None = None  # the count of a read(2) the driver holds
        self._injected: deque[bytes] = deque()  # what the next reads return instead
        self._spurious = False  # one READY with nothing to read (see nothing_pending)
        self._was_registered = False
        self._logged = 0

    # --- lifecycle ------------------------------------------------------------

    def start(self) -> Simulator:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:  # a socket left by an earlier run goes; anything else stays
            if not stat.S_ISSOCK(st.st_mode):
                raise FileExistsError(errno.EEXIST, "exists and is not a socket", self.path)
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
            if isinstance(self.driver, LinuxDriver) and self.conn is not None:
                # module unload: the last word a daemon gets is POLLERR|POLLHUP and EBADF
                self.driver.unload(self.clock())
                self._answer()
            self._close_conn("the simulator stopped")
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
            self._answer()
            self._report()
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

    def pre_suspend(self) -> None:
        """Linux only: hibernation begins (hv_vss_pre_suspend)."""
        with self.cond:
            self._linux().pre_suspend(self.clock())
            self._answer()
            self._report()
        self._wake()

    def pre_resume(self) -> None:
        """Linux only: the channel runs again (hv_vss_pre_resume)."""
        with self.cond:
            self._linux().pre_resume(self.clock())
            self._answer()
            self._report()
        self._wake()

    def hibernate(self) -> None:
        """Linux only: a hibernation, from pre_suspend to pre_resume."""
        self.pre_suspend()
        self.pre_resume()

    def drop_connection(self, timeout: float = 5.0) -> None:
        """Close the daemon's connection: a fault the device itself never makes (it
        reports POLLHUP only when torn down), standing for any failed read.

        The I/O thread closes it: closed from here while that thread sits in
        select() on it, the kernel would keep the socket alive until select
        returned, and the daemon would see no EOF."""
        with self.cond:
            self._drop = True
            self._wake()
            if not self.cond.wait_for(lambda: not self._drop, timeout):
                raise TimeoutError("the simulator did not drop the connection")

    def nothing_pending(self) -> None:
        """FreeBSD only: wake the daemon's poll although nothing waits, so that its
        IOCHVVSSREAD finds nothing (status VSS_FAIL): what it sees when the request
        timed out between its poll() and its READ."""
        if self.protocol != "freebsd":
            raise ValueError("only the FreeBSD driver has a READ that finds nothing")
        with self.cond:
            self._spurious = True
            self._answer()
        self._wake()

    def inject(self, record: bytes) -> None:
        """Fault injection: the daemon's next read returns `record`, whatever it is."""
        with self.cond:
            self._injected.append(record)
            self._answer()
        self._wake()

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
                    self._close_conn("connection dropped (fault injected)")
                    self._drop = False
                # the old connection before the new one: a daemon that closes the
                # device and opens it again finds it released, as close(2) leaves it
                if self.conn is not None and self.conn.fileno() in ready:
                    self._receive()
                if self._listener.fileno() in ready:
                    self._accept()
                self.driver.tick(self.clock())
                self._answer()
                self._report()
                self.cond.notify_all()

    def _accept(self) -> None:
        assert self._listener is not None
        s, _ = self._listener.accept()
        err = errno.EBUSY if self.conn is not None else self.driver.open()
        if err:
            self.refused += 1
            with contextlib.suppress(OSError):
                s.send(OPEN_STATUS.pack(err))
            s.close()
            self._event(f"open refused: {errno.errorcode.get(err, err)}")
            return
        s.send(OPEN_STATUS.pack(0))
        self.conn = s
        self.connections += 1
        self._event(f"a daemon opened the device (connection {self.connections})")

    def _receive(self) -> None:
        """Every record that waits: the daemon's calls, or its close."""
        while self.conn is not None:
            try:
                record = self.conn.recv(wire.MAX_RECORD, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                record = b""
            if not record:
                self._close_conn("the daemon closed the device")
                return
            try:
                call = wire.decode_request(record)
            except wire.WireError as e:
                self._close_conn(f"closed a connection that sent {e}")
                return
            self._call(call)

    def _call(self, call: wire.Request) -> None:
        now = self.clock()
        if isinstance(call, wire.Poll):
            self._armed = call.events
        elif self._injected and self._is_read(call):
            record = self._injected.popleft()
            self._send(wire.Result(len(record) if isinstance(call, wire.Read) else 0, record))
        elif isinstance(call, wire.Read):
            result = self.driver.d_read(call.count, now)
            if result is None:
                self._waiting_read = call.count
            else:
                self._send(wire.Result(*result))
        elif isinstance(call, wire.Write):
            self._send(wire.Result(self.driver.d_write(call.data, now)))
        else:
            self._send(wire.Result(*self.driver.d_ioctl(call.cmd, call.arg, now)))

    def _is_read(self, call: wire.Request) -> bool:
        return isinstance(call, wire.Read) or (
            isinstance(call, wire.Ioctl) and call.cmd == freebsd_wire.IOCHVVSSREAD)

    def _answer(self) -> None:
        """Return from a read the driver held, and answer the standing POLL, if now due."""
        if self.conn is not None and self._waiting_read is not None:
            if self._injected:
                record = self._injected.popleft()
                result: tuple[int, bytes] | None = (len(record), record)
            else:
                result = self.driver.d_read(self._waiting_read, self.clock())
            if result is not None:
                self._waiting_read = None
                self._send(wire.Result(*result))
        if self.conn is not None and self._armed is not None:
            revents = self.driver.d_poll(self._armed)
            if not revents and (self._injected or self._spurious):
                revents = self.driver.readable
            if revents:
                self._armed, self._spurious = None, False
                self._send(wire.Ready(revents))

    def _send(self, answer: wire.Answer) -> None:
        assert self.conn is not None
        try:
            self.conn.send(wire.encode(answer))
        except OSError:
            self._close_conn("the daemon's end is gone")

    def _close_conn(self, why: str) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
            self._armed = self._waiting_read = None
            self._injected.clear()
            self._spurious = False
            self.driver.release(self.clock())
            self._event(why)
            self._report()

    def _linux(self) -> LinuxDriver:
        if not isinstance(self.driver, LinuxDriver):
            raise ValueError("only the Linux driver has pre_suspend and pre_resume")
        return self.driver

    # --- what an operator sees ------------------------------------------------------

    def _event(self, text: str) -> None:
        if self.on_event is not None:
            self.on_event(text)

    def _report(self) -> None:
        for line in self.driver.log[self._logged:]:
            self._event(f"driver: {line}")
        self._logged = len(self.driver.log)
        if self.driver.registered != self._was_registered:
            self._was_registered = self.driver.registered
            self._event("the daemon is registered" if self._was_registered
                        else "no daemon is registered")
