"""A model of FreeBSD's VSS driver: sys/dev/hyperv/utilities/hv_snapshot.c.

No I/O and no clock of its own: the simulator server (or a test) feeds it the
host's messages, the daemon's system calls on its device and the time.  Read from the sources
(revisions 1633c008 and 67bc8c8b, the same logic); what it reproduces, each
with the function it comes from:

- two character devices, the filesystem daemon's (hv_fsvss_dev) and the
  application's (hv_appvss_dev), each registered to one opener: a second open
  is EBUSY (hv_vss_dev_open, hv_appvss_dev_open); neither cdevsw sets
  D_TRACKCLOSE, so d_close runs on the last close only, and clears the
  registration (hv_vss_dev_close);
- before the daemon has ever opened its device, host messages are not even
  read: they wait in the ring, negotiation included (hv_vss_callback queues no
  work while !register_done && proc_task == NULL); the first open drains them;
- once the daemon has closed or died, every host message except negotiation
  is answered HV_E_FAIL at once, without asking anyone
  (hv_vss_process_request, hv_vss_is_daemon_killed_after_launch); requests
  already queued stay queued: one the daemon had not read yet goes to the
  next opener's READ, if that comes before its timeout (hv_vss_dev_close
  clears register_done and nothing else);
- HOT_BACKUP, FREEZE and THAW become HV_VSS_CHECK, _FREEZE, _THAW, with a
  msgid of nanotime() in nanoseconds (hv_vss_init_req); GET_DM_INFO is
  answered success by the kernel; any other operation is only logged
  (device_printf) and never answered while the daemon is registered;
- one transaction at a time: a request arriving while any notify or ack
  queue holds one is silently ignored, with no reply ever
  (hv_vss_get_new_req_locked);
- order: CHECK and FREEZE go to the application first when one is registered,
  then to the daemon; THAW to the daemon, then the application
  (hv_vss_start_notify, hv_vss_app_acked, hv_vss_daemon_acked); an
  application's failure answers the host HV_E_FAIL and the daemon is never
  asked; the daemon's THAW failure does the same and the application never
  gets THAW;
- one callout of TIMEOUT_LIMIT (15 s, a parameter here) armed when the request
  first goes out; it covers the whole chain and is never re-armed at a
  hand-off; on expiry the request leaves whichever queue holds it and the host
  gets HV_E_FAIL; userland is not told (hv_vss_timeout);
- IOCHVVSSREAD with nothing to notify sets status VSS_FAIL and leaves opt and
  msgid 0; otherwise the request moves to the ack queue (hv_vss_notified);
- IOCHVVSSWRITE finds the request by msgid alone; none found (a late ack):
  dropped, VSS_FAIL set in the kernel's copy only; an opt that differs from
  the request's trips a KASSERT on a debug kernel, and a non-debug kernel
  branches on the opt the daemon wrote, so an opt outside 1..3 leaves the
  request to its timeout (hv_vss_daemon_acked); the daemon's status counts as
  success only when the u32 is 0, the application's is truncated to u8 first
  (hv_vss_app_acked);
- every reply to HOT_BACKUP carries VSS_HBU_NO_AUTO_RECOVERY
  (hv_vss_notify_host_result_locked, and the killed-daemon path);
- around the driver, the generic ioctl layer (sys_generic.c, kern_ioctl): an
  IOC_OUT request gets a zeroed buffer, copied out only when the driver
  returns 0; an IOC_IN request is copied in and never back; the driver
  returns 0 for every command, unknown ones included;
- poll(2) on the daemon's device returns POLLIN while its notify queue holds a
  request, whatever events were asked for, and never POLLHUP or POLLERR
  (hv_vss_dev_daemon_poll; sys_generic.c pollscan keeps the driver's revents
  as they are); the cdevsw has no d_read or d_write, so read(2) and write(2)
  fail with ENODEV (kern_conf.c, no_read and no_write).

Not modelled: the content of version negotiation (vmbus_ic_negomsg), the pool
of four request objects (one transaction at a time never exhausts it), and
the SIGKILL that detach sends to the openers.
"""

from __future__ import annotations

import errno
import select
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.kernel import freebsd_wire as fw
from agent.simulator import host

# Not a VSS operation: the IC negotiate message (ic_type HV_ICMSGTYPE_NEGOTIATE).
NEGOTIATE = -1

# sys/sys/ioccom.h
IOC_OUT = 0x40000000
IOC_IN = 0x80000000
IOCPARM_MASK = 0x1FFF

_TO_OPT = {host.VSS_OP_HOT_BACKUP: fw.HV_VSS_CHECK, host.VSS_OP_FREEZE: fw.HV_VSS_FREEZE,
           host.VSS_OP_THAW: fw.HV_VSS_THAW}

#: What IOCHVVSSREAD copies out when nothing is pending (hv_vss_notified).
NOTHING_PENDING = fw.MSG.pack(fw.HV_VSS_NONE, fw.VSS_FAIL, 0, bytes(48))


@dataclass
class Request:
    """struct hv_vss_req_internal: one host request on its way through the chain."""

    host: host.HostRequest
    opt: int
    msgid: int
    deadline: float  # the callout


@dataclass
class Device:
    """One of the two character devices and its queues (struct hv_vss_dev_sc)."""

    name: str
    registered: bool = False  # register_done / app_register_done
    opened_ever: bool = False  # proc_task != NULL: never cleared
    notify: deque[Request] = field(default_factory=deque)  # to_notify_queue
    ack: deque[Request] = field(default_factory=deque)  # to_ack_queue

    @property
    def pollin(self) -> bool:
        """hv_vss_dev_daemon_poll: POLLIN while the notify queue is not empty."""
        return bool(self.notify)


class FreeBSDDriver:
    #: What the daemon's poll() reports while a request waits for it.
    readable = select.POLLIN

    def __init__(self, chain_timeout: float = 15.0,
                 clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.chain_timeout = chain_timeout  # TIMEOUT_LIMIT
        self.clock_ns = clock_ns  # nanotime()
        self.daemon = Device("hv_fsvss_dev")
        self.app = Device("hv_appvss_dev")
        self.ring: deque[host.HostRequest] = deque()  # host messages not read yet
        self.callouts: list[Request] = []
        self.timer: float | None = None  # the earliest armed callout
        self.now = 0.0
        self.log: list[str] = []
        self.dropped_acks: list[bytes] = []  # acks that found no request
        self._next_id = 1

    @property
    def registered(self) -> bool:
        return self.daemon.registered

    # --- the host -------------------------------------------------------------

    def host_send(self, op: int, now: float) -> host.HostRequest:
        self.now = now
        req = host.HostRequest(op, self._next_id, now)
        self._next_id += 1
        self.ring.append(req)
        self._callback()
        return req

    def tick(self, now: float) -> None:
        self.now = now
        for req in [r for r in self.callouts if now >= r.deadline]:
            self._timeout(req)

    # --- the daemon's device, as the simulator server drives it ---------------

    def open(self) -> int:
        return self.open_device(self.daemon)

    def release(self, now: float) -> None:
        self.now = now
        self.close_device(self.daemon)

    def d_poll(self, events: int) -> int:
        """hv_vss_dev_daemon_poll: POLLIN or nothing, whatever `events` asked for."""
        return select.POLLIN if self.daemon.pollin else 0

    def d_read(self, count: int, now: float) -> tuple[int, bytes] | None:
        return -errno.ENODEV, b""  # no d_read in hv_vss_cdevsw

    def d_write(self, data: bytes, now: float) -> int:
        return -errno.ENODEV  # no d_write either

    def d_ioctl(self, cmd: int, arg: bytes, now: float) -> tuple[int, bytes]:
        """ioctl(2) on the daemon's device: (0 or -errno, the buffer copied out).

        The daemon passes as many bytes as the command's size names (the
        argument of an IOC_OUT command is ignored); an argument of another
        size is EFAULT, as a copyin past the end of the caller's buffer would be."""
        size = (cmd >> 16) & IOCPARM_MASK
        if cmd & IOC_IN and len(arg) != size:
            return -errno.EFAULT, b""
        buf = bytearray(arg if cmd & IOC_IN else bytes(size))
        ret = self.ioctl(self.daemon, cmd, buf, now)
        return -ret if ret else 0, bytes(buf) if cmd & IOC_OUT and not ret else b""

    # --- the ioctl layer (sys_generic.c kern_ioctl, then the cdevsw) ----------

    def open_device(self, dev: Device) -> int:
        if dev.registered:
            return errno.EBUSY
        dev.registered = True
        if dev is self.daemon:
            self._callback()  # hv_vss_dev_open runs the callback at once
        dev.opened_ever = True
        return 0

    def close_device(self, dev: Device) -> None:
        """hv_vss_dev_close, on the last close: the registration ends, the queues stay."""
        dev.registered = False

    def ioctl(self, dev: Device, cmd: int, buf: bytearray, now: float) -> int:
        self.now = now
        size = (cmd >> 16) & IOCPARM_MASK
        arg = bytes(buf[:size]) if cmd & IOC_IN else bytes(size)
        out: bytes | None = None
        if cmd == fw.IOCHVVSSREAD:
            out = self.read(dev)
        elif cmd == fw.IOCHVVSSWRITE:
            self._acked(dev, arg)
        if out is not None and cmd & IOC_OUT and not cmd & IOC_IN:
            buf[:size] = out
        return 0  # hv_vss_dev_daemon_ioctl returns 0 whatever the command

    def read(self, dev: Device) -> bytes:
        """hv_vss_notified."""
        if not dev.notify:
            self.log.append("hv_vss_notified: notify queue is empty!")
            return NOTHING_PENDING
        req = dev.notify.popleft()
        dev.ack.append(req)
        return fw.MSG.pack(req.opt, fw.VSS_SUCCESS, req.msgid, bytes(48))

    # --- internals, named after the functions they model ------------------------

    def _killed_after_launch(self) -> bool:
        return not self.daemon.registered and self.daemon.opened_ever

    def _callback(self) -> None:
        """hv_vss_callback: work is queued only once a daemon has opened the device."""
        if self.daemon.registered or self.daemon.opened_ever:
            self._process_requests()

    def _process_requests(self) -> None:
        """hv_vss_process_request: read every message waiting in the ring."""
        while self.ring:
            msg = self.ring.popleft()
            if msg.op == NEGOTIATE:
                self._respond(msg, host.HV_S_OK, "kernel")
            elif self._killed_after_launch():
                self._respond(msg, host.HV_E_FAIL, "kernel")
            elif msg.op in _TO_OPT:
                if self._busy():
                    self.log.append("hv_vss_get_new_req_locked: Warning: there is new request "
                                    "coming before finishing previous requests")
                    continue  # ignored: the host never gets an answer
                req = Request(msg, _TO_OPT[msg.op], self.clock_ns(), 0.0)
                self._start_notify(req)
            elif msg.op == host.VSS_OP_GET_DM_INFO:
                self._respond(msg, host.HV_S_OK, "kernel")
            else:
                self.log.append(f"Unknown opt from host: {msg.op}")

    def _busy(self) -> bool:
        return any((self.daemon.notify, self.daemon.ack, self.app.notify, self.app.ack))

    def _start_notify(self, req: Request) -> None:
        first = self.app if req.opt != fw.HV_VSS_THAW and self.app.registered else self.daemon
        first.notify.append(req)
        req.deadline = self.now + self.chain_timeout
        self.callouts.append(req)
        self._rearm()

    def _acked(self, dev: Device, data: bytes) -> None:
        """hv_vss_daemon_acked and hv_vss_app_acked."""
        opt, status, msgid, _ = fw.MSG.unpack(data)
        req = next((r for r in dev.ack if r.msgid == msgid), None)
        if req is None:
            self.log.append(f"Timeout: fail to find {'app' if dev is self.app else 'daemon'} "
                            f"ack request {msgid}")
            self.dropped_acks.append(data)
            return
        dev.ack.remove(req)
        if opt != req.opt:
            self.log.append(f"KASSERT: Mismatched VSS operation! ({opt} for {req.opt}; a debug "
                            "kernel panics, this one branches on the written opt)")
        ok = (status & 0xFF if dev is self.app else status) == fw.VSS_SUCCESS
        if dev is self.daemon:
            req.host.daemon_reply = data
            if opt in (fw.HV_VSS_CHECK, fw.HV_VSS_FREEZE):
                self._finish(req, ok, "daemon")
            elif opt == fw.HV_VSS_THAW and self.app.registered and ok:
                self.app.notify.append(req)
            elif opt == fw.HV_VSS_THAW:
                self._finish(req, ok, "daemon")
            return  # any other opt: the request is forgotten until its callout fires
        if not self.daemon.registered:
            self.log.append("hv_vss_app_acked: Fatal: vss daemon was killed")
        elif opt in (fw.HV_VSS_CHECK, fw.HV_VSS_FREEZE) and ok:
            self.daemon.notify.append(req)
        elif opt in (fw.HV_VSS_CHECK, fw.HV_VSS_FREEZE, fw.HV_VSS_THAW):
            self._finish(req, ok, "app")

    def _finish(self, req: Request, ok: bool, by: str) -> None:
        """callout_drain, then hv_vss_notify_host_result."""
        self._drain_callout(req)
        self._respond(req.host, host.HV_S_OK if ok else host.HV_E_FAIL, by)

    def _timeout(self, req: Request) -> None:
        """hv_vss_timeout: out of whichever queue holds it; the host gets HV_E_FAIL."""
        found = False
        for q in (self.daemon.notify, self.daemon.ack, self.app.notify, self.app.ack):
            if req in q:
                q.remove(req)
                found = True
        if not found:
            self.log.append("KASSERT: timeout but fail to find request (debug kernels panic)")
        self.log.append(f"timeout: request {req.msgid} answered HV_E_FAIL")
        self._drain_callout(req)
        self._respond(req.host, host.HV_E_FAIL, "timeout")

    def _drain_callout(self, req: Request) -> None:
        if req in self.callouts:
            self.callouts.remove(req)
        self._rearm()

    def _rearm(self) -> None:
        self.timer = min((r.deadline for r in self.callouts), default=None)

    def _respond(self, msg: host.HostRequest, status: int, by: str) -> None:
        if msg.done:
            return
        msg.status, msg.answered_by, msg.answered_at = status, by, self.now
        if msg.op == host.VSS_OP_HOT_BACKUP:
            msg.flags = host.VSS_HBU_NO_AUTO_RECOVERY


__all__ = ["NEGOTIATE", "NOTHING_PENDING", "Device", "FreeBSDDriver", "Request"]
