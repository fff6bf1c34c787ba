"""The only module that does kernel I/O: a device node, or the simulator's socket.

Same bytes either way.  Linux: read()/write() of 12-byte messages on
/dev/vmbus/hv_vss.  FreeBSD: ioctl IOCHVVSSREAD/IOCHVVSSWRITE of 64-byte
messages on /dev/hv_fsvss_dev.

Over the simulator's socket each of those system calls is a request record
that the simulator answers as the driver returns from it, and poll() a
standing request (agent/simulator/wire.py).  open(2)'s result is the first
record of every connection (agent/kernel/opening.py, which root runs before it
starts the child): attach() reads it for a device the child reopened, and
wrap() takes a descriptor whose open root has seen succeed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import stat
from typing import Protocol

from agent.kernel import freebsd_wire
from agent.kernel.opening import OPEN_WAIT, check_opened
from agent.simulator import wire as sim_wire

_READ_BUFFER = 256  # larger than any message: a shorter buffer fails the read (EINVAL)
# FreeBSD's stock daemon polls for POLLIN|POLLRDNORM; POLLRDNORM is POLLIN on Linux.
POLL_EVENTS = select.POLLIN | select.POLLRDNORM


class KernelLost(Exception):
    """The channel failed (EOF, read or write error): reopen and re-register."""


class Endpoint(Protocol):
    def fileno(self) -> int: ...
    def read(self) -> bytes: ...
    def write(self, frame: bytes) -> None: ...
    def close(self) -> None: ...


class DeviceEndpoint:
    """Linux character device: read()/write()."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def read(self) -> bytes:
        return os.read(self.fd, _READ_BUFFER)

    def write(self, frame: bytes) -> None:
        if os.write(self.fd, frame) != len(frame):
            raise OSError(errno.EIO, "short write")

    def close(self) -> None:
        os.close(self.fd)


class IoctlEndpoint(DeviceEndpoint):
    """FreeBSD character device: the two VSS ioctls, 64 bytes each way."""

    def read(self) -> bytes:
        buf = bytearray(freebsd_wire.MSG_SIZE)
        fcntl.ioctl(self.fd, freebsd_wire.IOCHVVSSREAD, buf, True)
        return bytes(buf)

    def write(self, frame: bytes) -> None:
        fcntl.ioctl(self.fd, freebsd_wire.IOCHVVSSWRITE, frame)


class SocketEndpoint:
    """The simulator: each system call a request record, answered by one RESULT
    record when the driver returns from it (agent/simulator/wire.py).

    poll(2) is a standing POLL request, re-armed after every call, that the
    simulator answers with a READY record once the driver would report the
    device readable; that record is what makes the socket readable for the
    caller's poll(), and the next call consumes it."""

    def __init__(self, fd: int, protocol: str) -> None:
        self.sock = socket.socket(fileno=fd)
        self.protocol = protocol
        self.armed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> bytes:
        if self.protocol == "freebsd":
            got = self._call(sim_wire.Ioctl(freebsd_wire.IOCHVVSSREAD,
                                            bytes(freebsd_wire.MSG_SIZE)))
        else:
            got = self._call(sim_wire.Read(_READ_BUFFER))
        return b"" if got is None else got.data  # None: the simulator has gone

    def write(self, frame: bytes) -> None:
        if self.protocol == "freebsd":
            got = self._call(sim_wire.Ioctl(freebsd_wire.IOCHVVSSWRITE, frame))
        else:
            got = self._call(sim_wire.Write(frame))
            if got is not None and got.ret != len(frame):
                raise OSError(errno.EIO, "short write")
        if got is None:
            raise OSError(errno.EPIPE, "the simulator closed the connection")

    def arm(self) -> None:
        if not self.armed:
            self.sock.send(sim_wire.encode(sim_wire.Poll(POLL_EVENTS)))
            self.armed = True

    def _call(self, call: sim_wire.Request) -> sim_wire.Result | None:
        self.sock.send(sim_wire.encode(call))
        while True:
            record = self.sock.recv(sim_wire.MAX_RECORD)
            if not record:
                return None
            try:
                answer = sim_wire.decode_answer(record)
            except sim_wire.WireError as e:
                raise OSError(errno.EPROTO, str(e)) from None
            if isinstance(answer, sim_wire.Result):
                break
            self.armed = False  # a READY that was waiting: its poll has been answered
        self.arm()
        if answer.ret < 0:
            err = -answer.ret
            raise OSError(err, os.strerror(err) if err in errno.errorcode else "unknown error")
        return answer

    def close(self) -> None:
        self.sock.close()


def attach(fd: int, protocol: str, timeout: float = OPEN_WAIT) -> Endpoint:
    """Wrap an open descriptor; for the simulator, collect open(2)'s result first."""
    check_opened(fd, timeout)
    return wrap(fd, protocol)


def wrap(fd: int, protocol: str) -> Endpoint:
    """Wrap a descriptor whose open is known to have succeeded (check_opened)."""
    if stat.S_ISSOCK(os.fstat(fd).st_mode):
        ep = SocketEndpoint(fd, protocol)
        ep.arm()
        return ep
    if protocol == "freebsd":
        return IoctlEndpoint(fd)
    return DeviceEndpoint(fd)


__all__ = ["Endpoint", "KernelLost", "SocketEndpoint", "attach", "wrap"]
