"""A model of Linux's VSS driver: drivers/hv/hv_snapshot.c over hv_utils_transport.c.

No I/O and no clock of its own: the simulator server feeds it daemon writes,
host requests and the time, and sends whatever it queues for the daemon.
Read from the current sources; what it reproduces, each with the function:

- one opener: a second open() is EBUSY (hvt_op_open);
- registration: a 12-byte message with operation REGISTER1 (129) is answered
  with the 4-byte u32 129; the driver is READY only once that answer has been
  read (vss_register_done); legacy REGISTER (128) gets no answer;
  registration during a transaction is EINVAL (vss_on_msg);
- HOT_BACKUP, FREEZE and THAW go to the daemon as a zeroed message with only
  the operation byte set; before registration they fail at once
  (vss_handle_request); GET_DM_INFO and every other operation are answered
  success by the kernel itself; note that the poll wrapper sets READY after
  those even when no daemon is registered, as the real code does;
- one transaction at a time: host messages wait in the ring meanwhile
  (hv_vss_onchannelcallback returns early while state > READY);
- timeouts: 15 * 60 s for FREEZE, HV_UTIL_TIMEOUT (30 s) otherwise
  (vss_send_op); on expiry the host gets HV_E_FAIL and nothing is thawed;
- a daemon write that is not 12 bytes, or arrives when no transaction waits
  for it (a late reply), is EINVAL;
- the host receives the daemon's 32-bit status verbatim; for a reply whose
  first byte is HOT_BACKUP (2) the body flags become VSS_HBU_NO_AUTO_RECOVERY
  (a reply built on the request keeps that byte only if the status' low byte
  is 2, which is why the real daemon never gets that flag set);
- close (hvt_op_release -> vss_on_reset): a transaction waiting for the daemon
  is answered HV_E_FAIL and the driver waits for a new registration;
- hibernation (hv_vss_pre_suspend): a fake THAW is queued for the daemon,
  pending work is cancelled, and the state is forced to READY, so the
  daemon's reply will be EINVAL.
"""

from __future__ import annotations

import enum
import errno
import struct
from collections import deque
from collections.abc import Callable

from agent.kernel import linux_wire as lw
from agent.simulator.host import VSS_HBU_NO_AUTO_RECOVERY, HostRequest

DAEMON_OPS = (lw.VSS_OP_HOT_BACKUP, lw.VSS_OP_FREEZE, lw.VSS_OP_THAW)


class DevState(enum.IntEnum):
    DEVICE_INIT = 0
    READY = 1
    HOSTMSG_RECEIVED = 2
    USERSPACE_REQ = 3
    USERSPACE_RECV = 4


class LinuxDriver:
    def __init__(self, freeze_timeout: float = 15 * 60.0, util_timeout: float = 30.0) -> None:
        self.freeze_timeout = freeze_timeout  # VSS_FREEZE_TIMEOUT
        self.util_timeout = util_timeout  # HV_UTIL_TIMEOUT
        self.state = DevState.DEVICE_INIT
        self.chardev_open = False
        self.outmsg: bytes | None = None
        self.on_read: Callable[[], None] | None = None
        self.ring: deque[HostRequest] = deque()
        self.current: HostRequest | None = None
        self.timer: float | None = None  # deadline of the pending timeout work
        self.now = 0.0
        self.log: list[str] = []
        self._next_id = 1

    @property
    def registered(self) -> bool:
        return self.chardev_open and self.state >= DevState.READY

    # --- host side ------------------------------------------------------------

    def host_send(self, op: int, now: float) -> HostRequest:
        self.now = now
        req = HostRequest(op, self._next_id, now)
        self._next_id += 1
        self.ring.append(req)
        self._channel_callback()
        return req

    def tick(self, now: float) -> None:
        self.now = now
        if self.timer is not None and now >= self.timer:
            self.timer = None
            self.log.append("VSS: timeout waiting for daemon to reply")
            self._respond(lw.HV_E_FAIL, "timeout")
            self._poll_wrapper()

    def pre_suspend(self, now: float) -> None:
        """Hibernation: fake a THAW for the daemon and force READY."""
        self.now = now
        self.timer = None  # hv_vss_cancel_work
        self._transport_send(self._op_message(lw.VSS_OP_THAW), None)
        self.state = DevState.READY
        self.log.append("pre_suspend: fake THAW queued, state forced READY")

    # --- daemon side (the character device) -------------------------------------

    def open(self) -> int:
        if self.chardev_open:
            return errno.EBUSY
        self.chardev_open = True
        return 0

    def release(self, now: float) -> None:
        self.now = now
        self.chardev_open = False
        self.outmsg, self.on_read = None, None
        # vss_on_reset
        if self.timer is not None:
            self.timer = None
            self._respond(lw.HV_E_FAIL, "reset")
        self.state = DevState.DEVICE_INIT

    def take_outmsg(self) -> bytes | None:
        """The daemon reads the pending message (hvt_op_read)."""
        msg, cb = self.outmsg, self.on_read
        self.outmsg, self.on_read = None, None
        if msg is not None and cb is not None:
            cb()
        return msg

    def write(self, data: bytes, now: float) -> int:
        """vss_on_msg: 0, or the errno the daemon's write() would fail with."""
        self.now = now
        if len(data) != lw.MSG_SIZE:
            return errno.EINVAL
        op = data[0]
        if op in (lw.VSS_OP_REGISTER, lw.VSS_OP_REGISTER1):
            if self.state > DevState.READY:
                self.log.append("VSS: Got unexpected registration request")
                return errno.EINVAL
            if op == lw.VSS_OP_REGISTER1:
                if not self._transport_send(struct.pack("<I", lw.VSS_OP_REGISTER1),
                                            self._register_done):
                    return errno.EFAULT
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
        return errno.EINVAL

    # --- internals, named after the functions they model --------------------------

    def _op_message(self, op: int) -> bytes:
        return struct.pack("<B7xI", op, 0)

    def _transport_send(self, msg: bytes, on_read: Callable[[], None] | None) -> bool:
        if not self.chardev_open or self.outmsg is not None:
            return False
        self.outmsg, self.on_read = msg, on_read
        return True

    def _register_done(self) -> None:
        self._poll_wrapper()

    def _poll_wrapper(self) -> None:
        self.state = DevState.READY
        self._channel_callback()

    def _respond(self, status: int, by: str) -> None:
        req = self.current
        if req is None or req.done:
            return
        req.status, req.answered_by, req.answered_at = status, by, self.now

    def _channel_callback(self) -> None:
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
        if not self._transport_send(self._op_message(op), None):
            self.log.append("VSS: failed to communicate to the daemon")
            self.timer = None
            self._respond(lw.HV_E_FAIL, "kernel")
            self.state = DevState.READY
