"""The simulator's model of drivers/hv/hv_snapshot.c: each rule its docstring claims."""

from __future__ import annotations

import errno
import struct

from agent.kernel import linux_wire as lw
from agent.simulator.linux_driver import DevState, LinuxDriver

REG1 = bytes([129]) + bytes(11)
OK = bytes(12)


def registered() -> LinuxDriver:
    d = LinuxDriver(freeze_timeout=900, util_timeout=30)
    assert d.open() == 0
    assert d.write(REG1, 0.0) == 0
    assert d.take_outmsg() == struct.pack("<I", 129)
    assert d.registered
    return d


def test_one_opener():
    d = LinuxDriver()
    assert d.open() == 0
    assert d.open() == errno.EBUSY


def test_ready_only_once_the_answer_is_read():
    d = LinuxDriver()
    d.open()
    d.write(REG1, 0.0)
    assert d.state is DevState.DEVICE_INIT
    req = d.host_send(lw.VSS_OP_FREEZE, 0.1)
    assert (req.status, req.answered_by) == (lw.HV_E_FAIL, "kernel")  # not registered yet
    d.take_outmsg()
    assert d.state is DevState.READY


def test_legacy_register_gets_no_answer():
    d = LinuxDriver()
    d.open()
    assert d.write(bytes([128]) + bytes(11), 0.0) == 0
    assert d.take_outmsg() is None


def test_daemon_ops_are_forwarded_as_op_byte_only():
    d = registered()
    req = d.host_send(lw.VSS_OP_HOT_BACKUP, 1.0)
    assert d.take_outmsg() == bytes([2]) + bytes(11)
    assert d.write(OK, 1.5) == 0
    assert (req.status, req.answered_by, req.daemon_reply) == (0, "daemon", OK)
    assert req.latency == 0.5


def test_kernel_answers_other_operations_itself():
    d = registered()
    for op in (lw.VSS_OP_GET_DM_INFO, lw.VSS_OP_CREATE, lw.VSS_OP_BU_COMPLETE):
        req = d.host_send(op, 1.0)
        assert (req.status, req.answered_by) == (0, "kernel")
        assert d.take_outmsg() is None


def test_one_transaction_at_a_time_others_wait_in_the_ring():
    d = registered()
    first = d.host_send(lw.VSS_OP_FREEZE, 1.0)
    second = d.host_send(lw.VSS_OP_THAW, 1.1)
    assert d.take_outmsg() == bytes([5]) + bytes(11)
    assert not second.done and d.take_outmsg() is None
    d.write(OK, 1.2)
    assert first.done
    assert d.take_outmsg() == bytes([6]) + bytes(11)  # now the queued THAW goes out


def test_timeouts_freeze_long_others_short():
    d = registered()
    freeze = d.host_send(lw.VSS_OP_FREEZE, 0.0)
    d.take_outmsg()
    d.tick(899.0)
    assert not freeze.done
    d.tick(900.0)
    assert (freeze.status, freeze.answered_by) == (lw.HV_E_FAIL, "timeout")
    assert d.write(OK, 901.0) == errno.EINVAL  # the late reply: "Transaction not active"
    thaw = d.host_send(lw.VSS_OP_THAW, 1000.0)
    d.take_outmsg()
    d.tick(1030.0)
    assert thaw.answered_by == "timeout"


def test_bad_writes_are_einval():
    d = registered()
    assert d.write(bytes(11), 0.0) == errno.EINVAL
    assert d.write(OK, 0.0) == errno.EINVAL  # no transaction waits for it
    d.host_send(lw.VSS_OP_FREEZE, 0.0)
    d.take_outmsg()
    assert d.write(REG1, 0.1) == errno.EINVAL  # registration during a transaction


def test_the_daemons_status_reaches_the_host_verbatim():
    d = registered()
    req = d.host_send(lw.VSS_OP_FREEZE, 0.0)
    d.take_outmsg()
    d.write(struct.pack("<I", lw.HV_E_FAIL) + bytes(8), 0.1)
    assert req.status == lw.HV_E_FAIL


def test_hot_backup_flag_only_when_the_reply_keeps_byte_zero_at_two():
    d = registered()
    req = d.host_send(lw.VSS_OP_HOT_BACKUP, 0.0)
    d.take_outmsg()
    d.write(OK, 0.1)  # HV_S_OK overwrites the op byte with 0
    assert req.flags == 0


def test_close_fails_the_pending_request_and_needs_reregistration():
    d = registered()
    req = d.host_send(lw.VSS_OP_FREEZE, 0.0)
    d.take_outmsg()
    d.release(0.5)
    assert (req.status, req.answered_by) == (lw.HV_E_FAIL, "reset")
    assert d.state is DevState.DEVICE_INIT
    assert d.host_send(lw.VSS_OP_THAW, 1.0).answered_by == "kernel"


def test_hibernation_fake_thaw_makes_the_reply_fail():
    d = registered()
    d.host_send(lw.VSS_OP_FREEZE, 0.0)
    d.take_outmsg()
    d.write(OK, 0.1)
    d.pre_suspend(5.0)
    assert d.take_outmsg() == bytes([6]) + bytes(11)
    assert d.write(OK, 5.1) == errno.EINVAL
