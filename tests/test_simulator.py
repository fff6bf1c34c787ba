"""The simulator over its socket behaves as the kernel does on the fault paths.

A bare daemon of our own (no agent) makes the system calls one record at a
time (agent/simulator/wire.py) and checks what comes back against the kernel
functions named in each test: Linux's drivers/hv/hv_snapshot.c over
hv_utils_transport.c, FreeBSD's sys/dev/hyperv/utilities/hv_snapshot.c.
Then the agent's own transport (SocketEndpoint, KernelChannel) against it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import socket
import struct
import time

import pytest

from agent.kernel import freebsd_wire as fw
from agent.kernel import linux_wire as lw
from agent.kernel import transport
from agent.kernel.channel import KernelChannel, KernelLost
from agent.kernel.opening import check_opened
from agent.kernel.protocol import LINUX, PROTOCOLS
from agent.kernel.transport import DeviceEndpoint, IoctlEndpoint, SocketEndpoint, attach
from agent.simulator import host, wire
from agent.simulator.freebsd_driver import NOTHING_PENDING
from agent.simulator.server import Simulator
from tests.helpers import wait_for

REG1 = bytes([129]) + bytes(11)
OK = bytes(12)
ANSWER = struct.pack("<I", 129)
POLLIN_RDNORM = select.POLLIN | select.POLLRDNORM


def op(code: int) -> bytes:
    return bytes([code]) + bytes(11)


class Daemon:
    """A daemon's end of the simulator's socket: system calls as records."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(path)
        (self.open_errno,) = wire.OPEN_STATUS.unpack(self.sock.recv(64))
        self.armed = False  # a POLL sent and not answered yet

    def send(self, msg: wire.Request) -> None:
        self.sock.send(wire.encode(msg))

    def answer(self, timeout: float = 5.0) -> wire.Answer | None:
        """The next record, or None if none comes within `timeout`; EOF is an error."""
        if not select.select([self.sock], [], [], timeout)[0]:
            return None
        record = self.sock.recv(wire.MAX_RECORD)
        assert record, "the simulator closed the connection"
        return wire.decode_answer(record)

    def call(self, msg: wire.Request) -> wire.Result:
        """One system call; a READY that arrives meanwhile answers the standing POLL."""
        self.send(msg)
        while isinstance(got := self.answer(), wire.Ready):
            self.armed = False
        assert isinstance(got, wire.Result), got
        return got

    def poll(self, events: int = POLLIN_RDNORM, timeout: float = 5.0) -> int | None:
        """poll(2): the driver's revents, or None if it reports nothing in `timeout`
        (the POLL then stays armed, as the agent's does between its calls)."""
        if not self.armed:
            self.send(wire.Poll(events))
            self.armed = True
        got = self.answer(timeout)
        assert got is None or isinstance(got, wire.Ready), got
        if got is None:
            return None
        self.armed = False
        return got.revents

    def socket_revents(self) -> int:
        p = select.poll()
        p.register(self.sock, select.POLLIN | select.POLLRDNORM)
        events = p.poll(0)
        return events[0][1] if events else 0

    def close(self) -> None:
        self.sock.close()


def linux_daemon(sim: Simulator) -> Daemon:
    """Opened and registered, as hv_vss_daemon does it: write REGISTER1, read the answer."""
    d = Daemon(sim.path)
    assert d.open_errno == 0
    assert d.call(wire.Write(REG1)) == wire.Result(12)
    assert d.call(wire.Read(256)) == wire.Result(4, ANSWER)
    sim.wait_registered(5)
    return d


def ioctl_read(d: Daemon) -> bytes:
    got = d.call(wire.Ioctl(fw.IOCHVVSSREAD, bytes(64)))
    assert got.ret == 0 and len(got.data) == 64
    return got.data


def ack(opt: int, msgid: int, status: int = 0) -> bytes:
    return fw.MSG.pack(opt, status, msgid, bytes(48))


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "vss.sock")


# --- D1: a message counts as read when the daemon's read() takes it ------------------------


def test_linux_not_ready_until_the_daemon_read_the_registration_answer(sock_path):
    """vss_register_done is hvt_op_read's on_read callback: before that read the driver is
    in DEVICE_INIT, and vss_handle_request answers the host HV_E_FAIL at once."""
    with Simulator(sock_path) as sim:
        d = Daemon(sock_path)
        assert d.call(wire.Write(REG1)) == wire.Result(12)
        assert d.poll() == POLLIN_RDNORM  # the answer waits for the daemon to read it
        time.sleep(0.2)
        assert not sim.registered()
        early = sim.request("freeze", timeout=5)
        assert (early.status, early.answered_by) == (lw.HV_E_FAIL, "kernel")
        assert d.call(wire.Read(256)) == wire.Result(4, ANSWER)
        sim.wait_registered(5)
        check = sim.send("check")
        assert d.poll() == POLLIN_RDNORM
        assert d.call(wire.Read(256)) == wire.Result(12, op(lw.VSS_OP_HOT_BACKUP))
        assert d.call(wire.Write(OK)) == wire.Result(12)
        assert sim.wait(check, 5).status == lw.HV_S_OK
        d.close()


def test_linux_a_stopped_daemon_gets_one_request_the_next_fails_at_once(sock_path):
    """The timeout answers the host but leaves the unread message (vss_timeout_func);
    the next request then finds it there: hvutil_transport_send fails with EFAULT and
    vss_send_op answers HV_E_FAIL at once.  The daemon, resumed, reads the stale one."""
    with Simulator(sock_path, util_timeout=0.5) as sim:
        d = linux_daemon(sim)
        check = sim.send("check")
        thaw = sim.send("thaw")  # waits in the ring behind CHECK
        sim.wait(check, 5)
        sim.wait(thaw, 5)
        assert (check.status, check.answered_by) == (lw.HV_E_FAIL, "timeout")
        assert (thaw.status, thaw.answered_by) == (lw.HV_E_FAIL, "kernel")
        assert thaw.answered_at == check.answered_at  # in the same tick, not its own timeout
        assert d.call(wire.Read(256)) == wire.Result(12, op(lw.VSS_OP_HOT_BACKUP))
        assert d.poll(timeout=0.3) is None  # the THAW never reached the device
        assert d.call(wire.Write(OK)) == wire.Result(-errno.EINVAL)  # a late reply
        d.close()


def test_linux_hibernation_fake_thaw_is_lost_behind_an_unread_message(sock_path):
    """hv_vss_pre_suspend ignores hvutil_transport_send's EFAULT: a daemon that has not
    read its last message gets that message, not the fake THAW."""
    with Simulator(sock_path) as sim:
        d = linux_daemon(sim)
        sim.send("check")
        sim.hibernate()
        assert d.call(wire.Read(256)) == wire.Result(12, op(lw.VSS_OP_HOT_BACKUP))
        assert d.poll(timeout=0.3) is None
        assert any("fake THAW not sent" in line for line in sim.driver.log)
        d.close()


def test_linux_hibernation_holds_host_messages_until_pre_resume(sock_path):
    """pre_suspend disables the channel tasklet (tasklet_disable), pre_resume enables it:
    what the host sends in between is not even read until then."""
    with Simulator(sock_path) as sim:
        d = linux_daemon(sim)
        sim.pre_suspend()
        assert d.call(wire.Read(256)) == wire.Result(12, op(lw.VSS_OP_THAW))  # the fake THAW
        assert d.call(wire.Write(OK)) == wire.Result(-errno.EINVAL)
        check = sim.send("check")
        assert d.poll(timeout=0.5) is None and not check.done
        sim.pre_resume()
        assert d.poll() == POLLIN_RDNORM
        assert d.call(wire.Read(256)) == wire.Result(12, op(lw.VSS_OP_HOT_BACKUP))
        assert d.call(wire.Write(OK)) == wire.Result(12)
        assert sim.wait(check, 5).status == lw.HV_S_OK
        d.close()


def test_linux_read_waits_for_a_message(sock_path):
    """hvt_op_read sleeps until a message is there (wait_event_interruptible)."""
    with Simulator(sock_path) as sim:
        d = linux_daemon(sim)
        d.send(wire.Read(256))
        assert d.answer(0.3) is None
        sim.send("freeze")
        assert d.answer() == wire.Result(12, op(lw.VSS_OP_FREEZE))
        d.close()


def test_freebsd_a_request_that_timed_out_unread_is_never_delivered(sock_path):
    """hv_vss_timeout removes the request from the notify queue: the READ of a daemon
    that was stopped meanwhile finds nothing (hv_vss_notified: status VSS_FAIL), so a
    FREEZE the host gave up on is never executed."""
    with Simulator(sock_path, "freebsd", chain_timeout=0.5) as sim:
        d = Daemon(sock_path)
        assert d.poll(timeout=0.2) is None
        freeze = sim.send("freeze")
        assert d.poll() == select.POLLIN  # woken, then stopped before its READ
        sim.wait(freeze, 5)
        assert (freeze.status, freeze.answered_by) == (host.HV_E_FAIL, "timeout")
        assert ioctl_read(d) == NOTHING_PENDING
        assert d.poll(timeout=0.3) is None
        d.close()


def test_freebsd_a_request_outlives_a_daemon_that_died_before_reading_it(sock_path):
    """hv_vss_dev_close clears register_done and nothing else: the request stays in the
    notify queue and the next opener's READ takes it, msgid and all."""
    with Simulator(sock_path, "freebsd", chain_timeout=10.0) as sim:
        first = Daemon(sock_path)
        assert first.poll(timeout=0.2) is None
        check = sim.send("check")
        assert first.poll() == select.POLLIN
        first.close()  # dies before its READ
        assert wait_for(lambda: not sim.registered())
        second = Daemon(sock_path)
        assert second.open_errno == 0
        assert second.poll() == select.POLLIN
        got = ioctl_read(second)
        opt, status, msgid, _ = fw.MSG.unpack(got)
        assert (opt, status) == (fw.HV_VSS_CHECK, fw.VSS_SUCCESS)
        assert second.call(wire.Ioctl(fw.IOCHVVSSWRITE, ack(opt, msgid))) == wire.Result(0)
        assert sim.wait(check, 5).answered_by == "daemon" and check.status == host.HV_S_OK
        second.close()


# --- D2: a rejected write is an error on a channel that stays open -------------------------


def test_linux_rejected_write_is_einval_and_the_device_stays_open(sock_path):
    """hvt_op_write returns vss_on_msg's -EINVAL; nothing closes, nothing resets (the
    pending request is not failed), and the device never reports POLLHUP for it."""
    with Simulator(sock_path) as sim:
        d = linux_daemon(sim)
        freeze = sim.send("freeze")
        assert d.call(wire.Read(256)) == wire.Result(12, op(lw.VSS_OP_FREEZE))
        assert d.call(wire.Write(bytes(11))) == wire.Result(-errno.EINVAL)
        assert d.call(wire.Write(REG1)) == wire.Result(-errno.EINVAL)  # mid-transaction
        time.sleep(0.2)
        assert not freeze.done  # vss_on_reset did not run
        assert d.socket_revents() == 0  # no EOF, no POLLHUP
        assert d.call(wire.Write(OK)) == wire.Result(12)
        assert sim.wait(freeze, 5).status == lw.HV_S_OK
        assert sim.connections == 1 and sim.registered()
        d.close()


def test_freebsd_late_ack_is_dropped_and_the_ioctl_still_returns_0(sock_path):
    """hv_vss_daemon_acked finds no request: the ack is dropped, and the ioctl succeeds."""
    with Simulator(sock_path, "freebsd", chain_timeout=0.5) as sim:
        d = Daemon(sock_path)
        freeze = sim.send("freeze")
        assert d.poll() == select.POLLIN
        msgid = fw.MSG.unpack(ioctl_read(d))[2]
        sim.wait(freeze, 5)
        late = ack(fw.HV_VSS_FREEZE, msgid)
        assert d.call(wire.Ioctl(fw.IOCHVVSSWRITE, late)) == wire.Result(0)
        assert sim.driver.dropped_acks == [late]
        assert d.socket_revents() == 0
        d.close()


# --- D3: a short read is EINVAL and the message stays ----------------------------------------


def test_linux_short_read_is_einval_and_keeps_the_message(sock_path):
    """hvt_op_read checks count < outmsg_len before it copies or frees anything."""
    with Simulator(sock_path) as sim:
        d = Daemon(sock_path)
        d.call(wire.Write(REG1))
        assert d.call(wire.Read(3)) == wire.Result(-errno.EINVAL)
        assert not sim.registered()
        assert d.poll() == POLLIN_RDNORM  # still there
        assert d.call(wire.Read(4)) == wire.Result(4, ANSWER)
        sim.wait_registered(5)
        sim.send("thaw")
        assert d.call(wire.Read(11)) == wire.Result(-errno.EINVAL)
        assert d.call(wire.Read(12)) == wire.Result(12, op(lw.VSS_OP_THAW))
        d.close()


# --- poll: the driver's own revents -----------------------------------------------------------


def test_freebsd_poll_reports_pollin_alone(sock_path):
    """hv_vss_dev_daemon_poll returns POLLIN, unmasked by pollscan: no POLLRDNORM for a
    daemon that asks for POLLIN|POLLRDNORM as the stock one does, nor for POLLRDNORM."""
    with Simulator(sock_path, "freebsd") as sim:
        d = Daemon(sock_path)
        sim.send("check")
        assert d.poll(POLLIN_RDNORM) == select.POLLIN
        assert d.poll(select.POLLRDNORM) == select.POLLIN
        assert d.call(wire.Read(256)) == wire.Result(-errno.ENODEV)  # no d_read
        assert d.call(wire.Write(bytes(64))) == wire.Result(-errno.ENODEV)
        d.close()


def test_linux_poll_reports_pollin_pollrdnorm_and_pollhup_only_at_teardown(sock_path):
    """hvt_op_poll: EPOLLIN|EPOLLRDNORM while a message waits (do_pollfd keeps only what
    was asked, plus ERR and HUP); EPOLLERR|EPOLLHUP once hvutil_transport_destroy has
    run, when read() also fails with EBADF."""
    sim = Simulator(sock_path).start()
    try:
        d = linux_daemon(sim)
        sim.send("check")
        assert d.poll(POLLIN_RDNORM) == POLLIN_RDNORM
        assert d.poll(select.POLLIN) == select.POLLIN
        d.call(wire.Read(256))
        d.call(wire.Write(bytes(5)))  # rejected
        assert d.poll(timeout=0.3) is None
    finally:
        sim.stop()
    assert d.answer() == wire.Ready(select.POLLERR | select.POLLHUP)
    d.close()


def test_linux_teardown_fails_a_waiting_read_with_ebadf(sock_path):
    sim = Simulator(sock_path).start()
    try:
        d = linux_daemon(sim)
        d.send(wire.Read(256))
        assert d.answer(0.2) is None
    finally:
        sim.stop()
    assert d.answer() == wire.Result(-errno.EBADF)
    d.close()


# --- the agent's transport against the simulator ----------------------------------------------


def channel(sim: Simulator, protocol: str) -> KernelChannel:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    s.connect(sim.path)
    return KernelChannel(attach(s.detach(), protocol), PROTOCOLS[protocol])


def readable(ch: KernelChannel, timeout: float) -> bool:
    p = select.poll()
    p.register(ch.fileno(), ch.poll_mask)
    return bool(p.poll(int(timeout * 1000)))


def test_agent_transport_late_reply_is_a_write_failure_on_an_open_channel(sock_path):
    """What the agent's service sees of a late reply: the write raises EINVAL, and the
    channel is still there (its next read waits for a request, no EOF)."""
    with Simulator(sock_path, util_timeout=0.5) as sim:
        ch = channel(sim, "linux")
        assert ch.register() == 129
        sim.wait_registered(5)
        thaw = sim.send("thaw")
        assert readable(ch, 5)
        req = ch.read_request()
        assert req is not None
        sim.wait(thaw, 5)
        assert thaw.answered_by == "timeout"
        with pytest.raises(KernelLost, match=r"^write failed: Invalid argument$"):
            ch.reply(req, True)
        assert not readable(ch, 0.3)  # no EOF, no HUP: the device is still open
        check = sim.send("check")  # and it still works
        assert readable(ch, 5)
        req = ch.read_request()
        assert req is not None
        ch.reply(req, True)
        assert sim.wait(check, 5).status == lw.HV_S_OK
        ch.close()


def test_agent_transport_reads_a_request_only_when_it_asks(sock_path):
    """The FreeBSD flavour: poll, IOCHVVSSREAD, IOCHVVSSWRITE, each one call; a request
    that timed out between the poll and the read is a READ that finds nothing."""
    with Simulator(sock_path, "freebsd", chain_timeout=0.5) as sim:
        ch = channel(sim, "freebsd")
        assert ch.register() is None
        freeze = sim.send("freeze")
        assert readable(ch, 5)
        sim.wait(freeze, 5)
        assert ch.read_request() is None  # status VSS_FAIL: nothing to do
        check = sim.send("check")
        assert readable(ch, 5)
        req = ch.read_request()
        assert req is not None and req.code == fw.HV_VSS_CHECK
        ch.reply(req, True)
        assert sim.wait(check, 5).status == host.HV_S_OK
        ch.close()


@pytest.mark.parametrize(("sent", "says"), [
    (None, "the simulator closed the connection"),  # it hung up before open(2)'s result
    (b"\0\0", "the simulator closed the connection"),  # not open(2)'s result
    (struct.pack("<i", errno.EACCES), os.strerror(errno.EACCES)),
    (b"", "the simulator did not answer the open"),  # nothing at all, in time
])
def test_attach_takes_nothing_but_open_s_result_from_the_simulator(sent, says):
    """And closes the descriptor it was given when it refuses it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with theirs:
        if sent is None:
            theirs.shutdown(socket.SHUT_RDWR)
        elif sent:
            theirs.send(sent)
        fd = ours.detach()
        # the refusal is kept, and with it attach's frame: the descriptor is closed by
        # attach itself, not when the garbage collector drops what attach made of it
        with pytest.raises(OSError, match=re.escape(says)) as refused:
            attach(fd, "linux", timeout=0.2 if not sent else 5)
        with pytest.raises(OSError) as closed:
            os.fstat(fd)
        assert closed.value.errno == errno.EBADF
        assert refused.traceback


def test_the_parent_gives_a_silent_simulator_and_a_silent_kernel_5_s(monkeypatch):
    """The waits for open(2)'s result from the simulator (a reopen's, and root's at start)
    and for the Linux driver's answer to registration, seen at the wait itself (5 s, rather
    than spent here)."""
    waits: list[float] = []

    class Poll:  # select.poll() for register(): remembers the wait, and nothing comes
        def register(self, fd: int, mask: int) -> None: ...

        def poll(self, ms: int) -> list[tuple[int, int]]:
            waits.append(ms / 1000)
            return []

    monkeypatch.setattr(transport.select, "select",
                        lambda r, w, x, timeout: waits.append(timeout) or ([], [], []))
    monkeypatch.setattr(select, "poll", Poll)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with theirs, pytest.raises(OSError, match="did not answer the open"):
        attach(ours.detach(), "linux")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with theirs, pytest.raises(OSError, match="did not answer the open"):
        check_opened(ours.detach())  # root's wait, before it starts the child
    device, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ch = KernelChannel(DeviceEndpoint(device.detach()), LINUX)
    with kernel, pytest.raises(KernelLost, match="no answer to registration"):
        ch.register()
    ch.close()
    assert waits == [5.0, 5.0, 5.0]


def test_the_device_endpoint_speaks_one_record_per_read_and_write():
    """The Linux device's side of the transport (never run here against /dev/vmbus/hv_vss):
    read(2) and write(2) of whole records on one descriptor, as a SEQPACKET socket keeps
    them; a descriptor that is not a socket is the device, for either protocol."""
    device, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ch = KernelChannel(DeviceEndpoint(device.detach()), LINUX)
    with kernel:
        kernel.send(struct.pack("<I", lw.VSS_OP_REGISTER1))
        assert ch.register() == lw.VSS_OP_REGISTER1
        assert kernel.recv(256) == lw.encode_register()
        request = bytes([lw.VSS_OP_FREEZE]) + bytes(range(1, 12))
        kernel.send(request)
        req = ch.read_request()
        assert req is not None and req.raw == request
        ch.reply(req, False)
        assert kernel.recv(256) == struct.pack("<I", lw.HV_E_FAIL) + request[4:]
    with pytest.raises(KernelLost, match="the device was closed"):
        ch.read_request()
    fd = ch.fileno()
    ch.close()
    with pytest.raises(OSError) as closed:
        os.fstat(fd)
    assert closed.value.errno == errno.EBADF
    r, w = os.pipe()
    try:
        assert type(attach(r, "linux")) is DeviceEndpoint
        assert type(attach(w, "freebsd")) is IoctlEndpoint
    finally:
        os.close(r)
        os.close(w)


def test_a_short_write_to_the_simulated_device_is_an_error():
    """write(2) on the device returning less than the record: the channel is lost."""
    ours, sim = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ch = KernelChannel(SocketEndpoint(ours.detach(), "linux"), LINUX)
    with sim:
        sim.send(wire.encode(wire.Result(lw.MSG_SIZE - 1)))  # queued: the call's answer
        with pytest.raises(KernelLost, match=r"^write failed: short write$"):
            ch.reply(lw.decode_request(bytes(12)), True)
        call = wire.decode_request(sim.recv(wire.MAX_RECORD))
        assert isinstance(call, wire.Write) and len(call.data) == lw.MSG_SIZE
    ch.close()


def test_a_simulator_that_hangs_up_mid_call_is_a_lost_channel():
    """The simulator closes its side while the agent waits for a call's result: a write
    fails with EPIPE, a read finds the device closed."""
    for call in ("write", "read"):
        ours, sim = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ch = KernelChannel(SocketEndpoint(ours.detach(), "linux"), LINUX)
        with sim:
            sim.shutdown(socket.SHUT_WR)  # it still takes the call, and answers nothing
            if call == "write":
                with pytest.raises(KernelLost, match=r"^write failed: the simulator closed"):
                    ch.reply(lw.decode_request(bytes(12)), True)
            else:
                with pytest.raises(KernelLost, match=r"^the device was closed$"):
                    ch.read_request()
            assert isinstance(wire.decode_request(sim.recv(wire.MAX_RECORD)),
                              wire.Write if call == "write" else wire.Read)
        ch.close()


def test_one_poll_stays_armed_across_calls_until_the_simulator_answers_it():
    """poll(2) is one standing POLL record: made once, made again only after its READY."""
    ours, sim = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ch = KernelChannel(SocketEndpoint(ours.detach(), "linux"), LINUX)
    with sim:
        sim.setblocking(False)
        req = lw.decode_request(bytes(12))
        for _ in range(2):
            sim.send(wire.encode(wire.Result(lw.MSG_SIZE)))  # queued: the call's answer
            ch.reply(req, True)
        sim.send(wire.encode(wire.Ready(ch.poll_mask)))  # the poll answered, then a call
        sim.send(wire.encode(wire.Result(lw.MSG_SIZE)))
        ch.reply(req, True)
        sent = []
        with contextlib.suppress(BlockingIOError):
            while True:
                sent.append(type(wire.decode_request(sim.recv(wire.MAX_RECORD))))
        assert sent == [wire.Write, wire.Poll, wire.Write, wire.Write, wire.Poll]
    ch.close()


def test_start_refuses_to_replace_anything_but_a_socket(tmp_path):
    path = tmp_path / "precious"
    path.write_text("keep me")
    with pytest.raises(FileExistsError):
        Simulator(str(path)).start()
    assert path.read_text() == "keep me"
    assert not os.path.exists(str(path) + ".host")


def test_a_short_write_to_the_device_is_an_error(monkeypatch):
    """The kernel takes a reply whole or not at all: anything less is EIO, not success."""
    r, w = os.pipe()
    try:
        monkeypatch.setattr(transport.os, "write", lambda fd, data: len(data) - 1)
        with pytest.raises(OSError) as e:
            DeviceEndpoint(w).write(bytes(24))
        assert e.value.errno == errno.EIO
    finally:
        os.close(r)
        os.close(w)
