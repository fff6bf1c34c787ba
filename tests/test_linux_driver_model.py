"""The simulator's model of drivers/hv/hv_snapshot.c over hv_utils_transport.c: each rule
its docstring claims, through the device's own entry points (open, read, write, poll,
release)."""

from __future__ import annotations

import errno
import select
import struct

from agent.kernel import linux_wire as lw
from agent.simulator.linux_driver import DevState, LinuxDriver

REG1 = bytes([129]) + bytes(11)
OK = bytes(12)
ANSWER = struct.pack("<I", 129)
POLLIN = select.POLLIN | select.POLLRDNORM  # what the daemon polls for


def op(code: int) -> bytes:
    return bytes([code]) + bytes(11)


def registered() -> LinuxDriver:
    d = LinuxDriver(freeze_timeout=900, util_timeout=30)
    assert d.open() == 0
    assert d.d_write(REG1, 0.0) == 12
    assert d.d_read(256, 0.0) == (4, ANSWER)
    assert d.registered
    return d


def test_one_opener():
    d = LinuxDriver()
    assert d.open() == 0
    assert d.open() == errno.EBUSY


def test_ready_only_once_the_answer_is_read():
    """vss_register_done runs from hvt_op_read: until the daemon reads the answer the
    driver is still in DEVICE_INIT, and vss_handle_request fails a request at once."""
    d = LinuxDriver()
    d.open()
    d.d_write(REG1, 0.0)
    assert d.state is DevState.DEVICE_INIT and not d.registered
    req = d.host_send(lw.VSS_OP_FREEZE, 0.1)
    assert (req.status, req.answered_by) == (lw.HV_E_FAIL, "kernel")  # not registered yet
    assert d.d_read(256, 0.2) == (4, ANSWER)
    assert d.state is DevState.READY and d.registered


def test_legacy_register_gets_no_answer():
    d = LinuxDriver()
    d.open()
    assert d.d_write(bytes([128]) + bytes(11), 0.0) == 12
    assert d.d_read(256, 0.0) is None  # read() would wait


def test_daemon_ops_are_forwarded_as_op_byte_only():
    d = registered()
    req = d.host_send(lw.VSS_OP_HOT_BACKUP, 1.0)
    assert d.d_read(256, 1.0) == (12, op(2))
    assert d.d_write(OK, 1.5) == 12
    assert (req.status, req.answered_by, req.daemon_reply) == (0, "daemon", OK)
    assert req.latency == 0.5


def test_kernel_answers_other_operations_itself():
    d = registered()
    for code in (lw.VSS_OP_GET_DM_INFO, lw.VSS_OP_CREATE, lw.VSS_OP_BU_COMPLETE):
        req = d.host_send(code, 1.0)
        assert (req.status, req.answered_by) == (0, "kernel")
        assert d.d_read(256, 1.0) is None


def test_one_transaction_at_a_time_others_wait_in_the_ring():
    d = registered()
    first = d.host_send(lw.VSS_OP_FREEZE, 1.0)
    second = d.host_send(lw.VSS_OP_THAW, 1.1)
    assert d.d_read(256, 1.1) == (12, op(5))
    assert not second.done and d.d_read(256, 1.1) is None
    d.d_write(OK, 1.2)
    assert first.done
    assert d.d_read(256, 1.2) == (12, op(6))  # now the queued THAW goes out


def test_timeouts_freeze_long_others_short():
    d = registered()
    freeze = d.host_send(lw.VSS_OP_FREEZE, 0.0)
    d.d_read(256, 0.0)
    d.tick(899.0)
    assert not freeze.done
    d.tick(900.0)
    assert (freeze.status, freeze.answered_by) == (lw.HV_E_FAIL, "timeout")
    assert d.d_write(OK, 901.0) == -errno.EINVAL  # the late reply: "Transaction not active"
    thaw = d.host_send(lw.VSS_OP_THAW, 1000.0)
    d.d_read(256, 1000.0)
    d.tick(1030.0)
    assert thaw.answered_by == "timeout"


def test_a_message_stays_until_read_and_blocks_the_next_one():
    """The timeout leaves an unread message where it is (vss_timeout_func never touches
    the transport), and hvutil_transport_send refuses a second one (EFAULT): with the
    daemon stopped, the next request fails at once, and the daemon later reads the
    first."""
    d = registered()
    check = d.host_send(lw.VSS_OP_HOT_BACKUP, 0.0)
    thaw = d.host_send(lw.VSS_OP_THAW, 1.0)  # waits in the ring behind CHECK
    assert not thaw.done
    d.tick(30.0)
    assert check.answered_by == "timeout"
    assert (thaw.status, thaw.answered_by, thaw.answered_at) == (lw.HV_E_FAIL, "kernel", 30.0)
    assert "VSS: failed to communicate to the daemon: -14" in d.log
    assert d.d_read(256, 40.0) == (12, op(2))  # the stale CHECK
    assert d.d_write(OK, 40.1) == -errno.EINVAL


def test_a_short_read_is_einval_and_the_message_stays():
    """hvt_op_read: count < outmsg_len is EINVAL before anything is copied or freed."""
    d = LinuxDriver()
    d.open()
    d.d_write(REG1, 0.0)
    assert d.d_read(3, 0.0) == (-errno.EINVAL, b"")
    assert not d.registered  # on_read did not run either
    assert d.d_read(4, 0.0) == (4, ANSWER)
    assert d.registered
    freeze = d.host_send(lw.VSS_OP_FREEZE, 1.0)
    assert d.d_read(11, 1.0) == (-errno.EINVAL, b"")
    assert d.d_read(12, 1.0) == (12, op(5))
    assert d.d_write(OK, 1.1) == 12 and freeze.status == 0


def test_bad_writes_are_einval():
    d = registered()
    assert d.d_write(bytes(11), 0.0) == -errno.EINVAL
    assert d.d_write(OK, 0.0) == -errno.EINVAL  # no transaction waits for it
    d.host_send(lw.VSS_OP_FREEZE, 0.0)
    d.d_read(256, 0.0)
    assert d.d_write(REG1, 0.1) == -errno.EINVAL  # registration during a transaction
    assert d.d_ioctl(0x40407602, bytes(64), 0.1) == (-errno.ENOTTY, b"")  # no ioctl method


def test_the_daemons_status_reaches_the_host_verbatim():
    d = registered()
    req = d.host_send(lw.VSS_OP_FREEZE, 0.0)
    d.d_read(256, 0.0)
    d.d_write(struct.pack("<I", lw.HV_E_FAIL) + bytes(8), 0.1)
    assert req.status == lw.HV_E_FAIL


def test_hot_backup_flag_only_when_the_reply_keeps_byte_zero_at_two():
    d = registered()
    req = d.host_send(lw.VSS_OP_HOT_BACKUP, 0.0)
    d.d_read(256, 0.0)
    d.d_write(OK, 0.1)  # HV_S_OK overwrites the op byte with 0
    assert req.flags == 0


def test_close_fails_the_pending_request_and_needs_reregistration():
    d = registered()
    req = d.host_send(lw.VSS_OP_FREEZE, 0.0)
    d.d_read(256, 0.0)
    d.release(0.5)
    assert (req.status, req.answered_by) == (lw.HV_E_FAIL, "reset")
    assert d.state is DevState.DEVICE_INIT
    assert d.host_send(lw.VSS_OP_THAW, 1.0).answered_by == "kernel"


def test_close_drops_the_unread_message():
    """hvt_op_release -> hvt_reset frees outmsg: the next opener does not get it."""
    d = registered()
    d.host_send(lw.VSS_OP_FREEZE, 0.0)
    d.release(0.5)
    assert d.open() == 0
    assert d.d_poll(POLLIN) == 0 and d.d_read(256, 0.6) is None


def test_poll_reports_pollin_pollrdnorm_and_hangs_up_only_at_teardown():
    """hvt_op_poll: EPOLLIN|EPOLLRDNORM while a message waits, EPOLLERR|EPOLLHUP in
    DESTROY mode; do_pollfd keeps the events asked for, and always ERR and HUP."""
    d = registered()
    assert d.d_poll(POLLIN) == 0
    d.host_send(lw.VSS_OP_HOT_BACKUP, 0.0)
    assert d.d_poll(POLLIN) == POLLIN
    assert d.d_poll(select.POLLIN) == select.POLLIN
    d.d_read(256, 0.0)
    d.d_write(bytes(11), 0.1)  # rejected: nothing hangs up
    assert d.d_poll(POLLIN) == 0
    d.unload(1.0)
    assert d.d_poll(POLLIN) == select.POLLERR | select.POLLHUP
    assert d.d_read(256, 1.0) == (-errno.EBADF, b"")
    assert d.d_write(OK, 1.0) == -errno.EBADF


def test_hibernation_fake_thaw_makes_the_reply_fail():
    d = registered()
    d.host_send(lw.VSS_OP_FREEZE, 0.0)
    d.d_read(256, 0.0)
    d.d_write(OK, 0.1)
    d.pre_suspend(5.0)
    assert d.d_read(256, 5.0) == (12, op(6))
    assert d.d_write(OK, 5.1) == -errno.EINVAL


def test_hibernation_cancels_the_transaction_and_holds_host_messages_until_resume():
    """hv_vss_pre_suspend: tasklet_disable, then hv_vss_cancel_work (the pending
    timeout goes: the host never hears about that request), then the fake THAW; the
    channel callback runs again only from hv_vss_pre_resume's tasklet_enable."""
    d = registered()
    check = d.host_send(lw.VSS_OP_HOT_BACKUP, 0.0)
    d.d_read(256, 0.0)
    d.pre_suspend(1.0)
    d.tick(1000.0)
    assert not check.done and d.timer is None
    assert d.d_read(256, 2.0) == (12, op(6))
    freeze = d.host_send(lw.VSS_OP_FREEZE, 3.0)  # the tasklet is disabled
    d.tick(5000.0)
    assert not freeze.done and d.d_read(256, 3.0) is None
    d.pre_resume(6.0)
    assert d.d_read(256, 6.0) == (12, op(5))
    assert d.d_write(OK, 6.1) == 12 and freeze.status == 0 and not check.done


def test_hibernation_fake_thaw_is_lost_behind_an_unread_message():
    """hvutil_transport_send fails (EFAULT) while the daemon has not read the previous
    message, and hv_vss_pre_suspend ignores that: the daemon gets the old message."""
    d = registered()
    d.host_send(lw.VSS_OP_HOT_BACKUP, 0.0)
    d.pre_suspend(1.0)
    d.pre_resume(2.0)
    assert d.d_read(256, 3.0) == (12, op(2))
    assert d.d_read(256, 3.0) is None
    assert "pre_suspend: fake THAW not sent, state forced READY" in d.log
