"""A model of Linux's VSS driver: drivers/hv/hv_snapshot.c over hv_utils_transport.c.

No I/O and no clock of its own: the simulator server feeds it the daemon's
system calls (open, read, write, poll, close), host requests and the time.
Read from the current sources; what it reproduces, each with the function:

- one opener: a second open() is EBUSY (hvt_op_open);
- one message at a time for the daemon (hvt->outmsg): it stays until the
  daemon's read() takes it, and a second send while it is there fails
  (hvutil_transport_send: EFAULT, "Previous message wasn't received");
- read() waits for a message; a buffer shorter than the message is EINVAL and
  the message stays; a read that takes it runs the sender's on_read callback
  (hvt_op_read);
- poll() reports POLLIN|POLLRDNORM while a message waits, POLLERR|POLLHUP only
  once the device is being torn down, nothing otherwise (hvt_op_poll); poll(2)
  keeps of those the events asked for, and POLLERR and POLLHUP
  (fs/select.c, do_pollfd);
- write() returns the byte count, or the error vss_on_msg returned
  (hvt_op_write); after teardown read() and write() are EBADF;
- registration: a 12-byte message with operation REGISTER1 (129) is answered
  with the 4-byte u32 129; the driver is READY only once the daemon's read()
  took that answer (vss_register_done); legacy REGISTER (128) gets no answer;
  registration during a transaction is EINVAL (vss_on_msg);
- HOT_BACKUP, FREEZE and THAW go to the daemon as a zeroed message with only
  the operation byte set; before registration they fail at once
  (vss_handle_request); GET_DM_INFO and every other operation are answered
  success by the kernel itself; note that the poll wrapper sets READY after
  those even when no daemon is registered, as the real code does;
- one transaction at a time: host messages wait in the ring meanwhile
  (hv_vss_onchannelcallback returns early while state > READY); the channel
  callback is a tasklet, run when a host message arrives and when a
  transaction ends (vss_poll_wrapper);
- timeouts: 15 * 60 s for FREEZE, HV_UTIL_TIMEOUT (30 s) otherwise
  (vss_send_op); on expiry the host gets HV_E_FAIL and nothing is thawed;
  the message, if the daemon has not read it, stays for it to read
  (vss_timeout_func does not touch the transport);
- a daemon write that is not 12 bytes, or arrives when no transaction waits
  for it (a late reply), is EINVAL;
- the host receives the daemon's 32-bit status verbatim; for a reply whose
  first byte is HOT_BACKUP (2) the body flags become VSS_HBU_NO_AUTO_RECOVERY
  (a reply built on the request keeps that byte only if the status' low byte
  is 2, which is why the real daemon never gets that flag set);
- close (hvt_op_release -> hvt_reset -> vss_on_reset): the unread message is
  dropped, a transaction waiting for the daemon is answered HV_E_FAIL and the
  driver waits for a new registration;
- hibernation (hv_vss_pre_suspend): the channel tasklet is disabled, pending
  work is cancelled (the transaction in progress is never answered), a fake
  THAW is sent to the daemon (lost if a message is still unread, or nobody has
  the device open), and the state is forced to READY, so the daemon's reply
  will be EINVAL; host messages wait until hv_vss_pre_resume enables the
  tasklet again;
- teardown (hv_vss_deinit, hvutil_transport_destroy): the device reports
  POLLERR|POLLHUP, read() and write() fail with EBADF.

Not modelled: the netlink transport, and how the host's packets are laid out.
"""

from __future__ import annotations

import enum
import errno
import select
import struct
from collections import deque
from collections.abc import Callable

from agent.kernel import linux_wire as lw
from agent.simulator.host import VSS_HBU_NO_AUTO_RECOVERY, HostRequest

DAEMON_OPS = (lw.VSS_OP_HOT_BACKUP, lw.VSS_OP_FREEZE, lw.VSS_OP_THAW)

#: What hvt_op_poll returns while a message waits.
READABLE = select.POLLIN | select.POLLRDNORM
#: What it returns once the device is being torn down.
TORN_DOWN = select.POLLERR | select.POLLHUP


class DevState(enum.IntEnum):
    """enum hvutil_device_state (drivers/hv/hyperv_vmbus.h)."""

    DEVICE_INIT = 0
    READY = 1
    HOSTMSG_RECEIVED = 2
    USERSPACE_REQ = 3
    USERSPACE_RECV = 4
    DEVICE_DYING = 5


class Mode(enum.IntEnum):
    """hvt->mode (hv_utils_transport.h), without netlink."""

    INIT = 0
    CHARDEV = 2
    DESTROY = 3


class LinuxDriver:
    #: What the daemon's poll() reports while a message waits for it.
    readable = READABLE

    def __init__(self, freeze_timeout: float = 15 * 60.0, util_timeout: float = 30.0) -> None:
        self.freeze_timeout = freeze_timeout  # VSS_FREEZE_TIMEOUT
        self.util_timeout = util_timeout  # HV_UTIL_TIMEOUT
        self.state = DevState.DEVICE_INIT
        self.mode = Mode.INIT
        self.outmsg: bytes | None = None
        self.on_read: Callable[[], None] | None = None
        self.ring: deque[HostRequest] = deque()
        self.current: HostRequest | None = None
        self.timer: float | None = None  # deadline of the pending timeout work
        self.tasklet_disabled = False
        self.tasklet_scheduled = False  # scheduled while disabled: runs when enabled
        self.now = 0.0
        self.log: list[str] = []
        self._next_id = 1

    @property
    def chardev_open(self) -> bool:
        return self.mode is Mode.CHARDEV

    @property
    def registered(self) -> bool:
        return self.chardev_open and DevState.READY <= self.state < DevState.DEVICE_DYING

    # --- host side ------------------------------------------------------------

    def host_send(self, op: int, now: float) -> HostRequest:
        self.now = now
        req = HostRequest(op, self._next_id, now)
        self._next_id += 1
        self.ring.append(req)
        self._tasklet_schedule()  # the host's interrupt
        return req

    def tick(self, now: float) -> None:
        self.now = now
        if self.timer is not None and now >= self.timer:
            self.timer = None
            self.log.append("VSS: timeout waiting for daemon to reply")
            self._respond(lw.HV_E_FAIL, "timeout")
            self._poll_wrapper()

    def pre_suspend(self, now: float) -> None:
        """hv_vss_pre_suspend: hibernation begins."""
        self.now = now
        self.tasklet_disabled = True
        self.timer = None  # hv_vss_cancel_work
        sent = self._transport_send(self._op_message(lw.VSS_OP_THAW), None) == 0
        self.state = DevState.READY
        self.log.append(f"pre_suspend: fake THAW {'sent' if sent else 'not sent'}, "
                        "state forced READY")

    def pre_resume(self, now: float) -> None:
        """hv_vss_pre_resume: tasklet_enable, and a tasklet scheduled meanwhile runs."""
        self.now = now
        self.tasklet_disabled = False
        if self.tasklet_scheduled:
            self.tasklet_scheduled = False
            self._channel_callback()

    def unload(self, now: float) -> None:
        """hv_vss_deinit and hvutil_transport_destroy: the driver goes away."""
        self.now = now
        self.state = DevState.DEVICE_DYING
        self.timer = None
        self.mode = Mode.DESTROY

    # --- daemon side (the character device) -------------------------------------

    def open(self) -> int:
        """hvt_op_open: 0, or the errno open(2) fails with."""
        if self.mode is Mode.DESTROY:
            return errno.EBADF
        if self.mode is Mode.CHARDEV:
            return errno.EBUSY
        self.mode = Mode.CHARDEV
        return 0

    def release(self, now: float) -> None:
        """hvt_op_release: back to INIT, hvt_reset drops the unread message, vss_on_reset."""
        self.now = now
        if self.mode is not Mode.DESTROY:
            self.mode = Mode.INIT
        self.outmsg, self.on_read = None, None
        if self.timer is not None:
            self.timer = None
            self._respond(lw.HV_E_FAIL, "reset")
        self.state = DevState.DEVICE_INIT

    def d_poll(self, events: int) -> int:
        """hvt_op_poll, masked as poll(2) masks it."""
        if self.mode is Mode.DESTROY:
            mask = TORN_DOWN
        elif self.outmsg is not None:
            mask = READABLE
        else:
            mask = 0
        return mask & (events | select.POLLERR | select.POLLHUP)

    def d_read(self, count: int, now: float) -> tuple[int, bytes] | None:
        """hvt_op_read: (bytes read or -errno, data); None while it would wait."""
        self.now = now
        if self.mode is Mode.CHARDEV and self.outmsg is None:
            return None  # wait_event_interruptible
        if self.mode is Mode.DESTROY:
            return -errno.EBADF, b""
        if self.outmsg is None:
            return -errno.EAGAIN, b""
        if count < len(self.outmsg):
            return -errno.EINVAL, b""  # and the message stays
        msg, cb = self.outmsg, self.on_read
        self.outmsg, self.on_read = None, None
        if cb is not None:
            cb()
        return len(msg), msg

    def d_write(self, data: bytes, now: float) -> int:
        """hvt_op_write: the byte count, or -errno."""
        self.now = now
        if self.mode is Mode.DESTROY:
            return -errno.EBADF
        err = self.on_msg(data)
        return err if err else len(data)

    def d_ioctl(self, cmd: int, arg: bytes, now: float) -> tuple[int, bytes]:
        """The misc device has no ioctl method: vfs_ioctl says ENOTTY."""
        return -errno.ENOTTY, b""

    def on_msg(self, data: bytes) -> int:
        """vss_on_msg: 0, or -errno."""
        if len(data) != lw.MSG_SIZE:
            return -errno.EINVAL
        op = data[0]
        if op in (lw.VSS_OP_REGISTER, lw.VSS_OP_REGISTER1):
            if self.state > DevState.READY:
                self.log.append("VSS: Got unexpected registration request")
                return -errno.EINVAL
            if op == lw.VSS_OP_REGISTER1 and self._transport_send(
                    struct.pack("<I", lw.VSS_OP_REGISTER1), self._register_done):
                return -errno.EFAULT
            self.log.append(f"VSS: userspace daemon ver. {op} connected")
            return 0
        if self.state == DevState.USERSPACE_REQ:
            self.state = DevState.USERSPACE_RECV
            assert self.current is not None
            self.current.daemon_reply = bytes(data)
            if op == lw.VSS_OP_HOT_BACKUP:
                self.current.flags = VSS_HBU_NO_AUTO_RECOVERY
            if self.timer is not None:
                self.timer = None
                (status,) = struct.unpack_from("<I", data)
                self._respond(status, "daemon")
                self._poll_wrapper()
            return 0
        self.log.append("VSS: Transaction not active")
        return -errno.EINVAL

    # --- internals, named after the functions they model --------------------------

    def _op_message(self, op: int) -> bytes:
        return struct.pack("<B7xI", op, 0)

    def _transport_send(self, msg: bytes, on_read: Callable[[], None] | None) -> int:
        """hvutil_transport_send: 0 or -errno."""
        if self.mode is not Mode.CHARDEV:
            return -errno.EINVAL
        if self.outmsg is not None:
            return -errno.EFAULT  # the previous message was not read
        self.outmsg, self.on_read = msg, on_read
        return 0

    def _register_done(self) -> None:
        self._poll_wrapper()

    def _poll_wrapper(self) -> None:
        self.state = DevState.READY
        self._tasklet_schedule()

    def _tasklet_schedule(self) -> None:
        if self.tasklet_disabled:
            self.tasklet_scheduled = True
        else:
            self._channel_callback()

    def _respond(self, status: int, by: str) -> None:
        req = self.current
        if req is None or req.done:
            return
        req.status, req.answered_by, req.answered_at = status, by, self.now

    def _channel_callback(self) -> None:
        """hv_vss_onchannelcallback, then vss_handle_request: one host message."""
        if self.mode is Mode.DESTROY:
            return  # the channel was closed with the driver (util_remove)
        if self.state > DevState.READY or not self.ring:
            return
        self.current = req = self.ring.popleft()
        if req.op in DAEMON_OPS:
            if self.state < DevState.READY:
                self._respond(lw.HV_E_FAIL, "kernel")  # userspace is not registered yet
                return
            self.state = DevState.HOSTMSG_RECEIVED
            self._send_op(req.op)
            return
        self._respond(lw.HV_S_OK, "kernel")
        self._poll_wrapper()

    def _send_op(self, op: int) -> None:
        self.state = DevState.USERSPACE_REQ
        self.timer = self.now + (self.freeze_timeout if op == lw.VSS_OP_FREEZE
                                 else self.util_timeout)
        rc = self._transport_send(self._op_message(op), None)
        if rc:
            self.log.append(f"VSS: failed to communicate to the daemon: {rc}")
            self.timer = None
            self._respond(lw.HV_E_FAIL, "kernel")
            self.state = DevState.READY
