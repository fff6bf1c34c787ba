"""FreeBSD's VSS driver (hv_snapshot.c) as modelled, and our protocol code against it.

First the model's rules, sans-I/O, one test per rule of the model's docstring;
then the agent's own protocol path (KernelChannel over IoctlEndpoint, the
engine) driven against the model through a stand-in for fcntl.ioctl, so the
ioctl request codes and buffers are the ones the device would see.
"""

from __future__ import annotations

import errno
import select
from collections.abc import Callable

import pytest

from agent.engine import machine as E
from agent.kernel import freebsd_wire as fw
from agent.kernel import transport
from agent.kernel.channel import KernelChannel
from agent.kernel.messages import KernelProtocolError, KernelRequest
from agent.kernel.protocol import FREEBSD
from agent.protocols.verb import Verb
from agent.simulator import host
from agent.simulator.freebsd_driver import NEGOTIATE, NOTHING_PENDING, FreeBSDDriver
from privileged import wire

pytestmark = pytest.mark.freebsd_model

MSGID = 0x18EB61C2_7A722FBF  # what nanotime() gave, in nanoseconds


def driver(**kw: object) -> FreeBSDDriver:
    clock = iter(range(MSGID, MSGID + 1000))
    return FreeBSDDriver(clock_ns=lambda: next(clock), **kw)  # type: ignore[arg-type]


def ack(opt: int, msgid: int, status: int = 0) -> bytes:
    return fw.MSG.pack(opt, status, msgid, bytes(48))


def opened(**kw: object) -> FreeBSDDriver:
    d = driver(**kw)
    assert d.open() == 0
    return d


def daemon_read(d: FreeBSDDriver, now: float = 0.0) -> bytes:
    """IOCHVVSSREAD on the daemon's device, through the generic ioctl layer."""
    ret, out = d.d_ioctl(fw.IOCHVVSSREAD, bytes(64), now)
    assert ret == 0 and len(out) == 64
    return out


def daemon_write(d: FreeBSDDriver, data: bytes, now: float) -> None:
    """IOCHVVSSWRITE: it always returns 0, and nothing is copied back."""
    assert d.d_ioctl(fw.IOCHVVSSWRITE, data, now) == (0, b"")


# --- golden bytes ------------------------------------------------------------------


def test_golden_reply_bytes_echo_opt_and_msgid():
    req = KernelRequest(Verb.FREEZE, 2, bytes(64), 0x0123456789ABCDEF)
    assert fw.encode_reply(req, True) == bytes.fromhex(
        "02000000" "00000000" "efcdab8967452301") + bytes(48)
    assert fw.encode_reply(req, False) == bytes.fromhex(
        "02000000" "01000000" "efcdab8967452301") + bytes(48)


def test_golden_request_decoding():
    frame = bytes.fromhex("03000000" "00000000" "bf2f727ac261eb18") + bytes(48)
    req = fw.decode_request(frame)
    assert req is not None
    assert (req.op, req.code, req.msgid) == (Verb.THAW, 3, 0x18EB61C27A722FBF)
    assert fw.decode_request(NOTHING_PENDING) is None
    assert NOTHING_PENDING == bytes.fromhex("00000000" "01000000") + bytes(56)
    for size in (0, 63, 65, 128):
        with pytest.raises(KernelProtocolError):
            fw.decode_request(bytes(size))


# --- the model's rules ---------------------------------------------------------------


def test_exclusive_open_and_reopen_after_close():
    d = opened()
    assert d.open() == errno.EBUSY
    d.release(0.0)
    assert d.open() == 0


def test_host_messages_wait_unread_until_the_first_open():
    d = driver()
    nego = d.host_send(NEGOTIATE, 0.0)
    check = d.host_send(host.VSS_OP_HOT_BACKUP, 0.0)
    dm = d.host_send(host.VSS_OP_GET_DM_INFO, 0.0)
    d.tick(100.0)
    assert not (nego.done or check.done or dm.done) and len(d.ring) == 3
    assert d.open() == 0
    assert (nego.status, dm.status) == (host.HV_S_OK, host.HV_S_OK)
    assert daemon_read(d) == ack(fw.HV_VSS_CHECK, MSGID)


def test_after_the_daemon_closed_everything_fails_at_once_but_negotiation():
    d = opened()
    d.release(1.0)
    answers = {op: d.host_send(op, 2.0) for op in (
        host.VSS_OP_FREEZE, host.VSS_OP_THAW, host.VSS_OP_HOT_BACKUP,
        host.VSS_OP_GET_DM_INFO, host.VSS_OP_CREATE)}
    for req in answers.values():
        assert (req.status, req.answered_by, req.answered_at) == (host.HV_E_FAIL, "kernel", 2.0)
    assert answers[host.VSS_OP_HOT_BACKUP].flags == host.VSS_HBU_NO_AUTO_RECOVERY
    assert d.host_send(NEGOTIATE, 3.0).status == host.HV_S_OK
    assert not d.daemon.pollin


def test_a_request_queued_when_the_daemon_closed_waits_for_its_timeout():
    d = opened()
    freeze = d.host_send(host.VSS_OP_FREEZE, 0.0)
    d.release(1.0)
    d.tick(14.9)
    assert not freeze.done
    d.tick(15.0)
    assert (freeze.status, freeze.answered_by) == (host.HV_E_FAIL, "timeout")


def test_one_transaction_at_a_time_the_next_request_is_ignored_for_good():
    d = opened()
    check = d.host_send(host.VSS_OP_HOT_BACKUP, 0.0)
    freeze = d.host_send(host.VSS_OP_FREEZE, 1.0)  # while CHECK is pending
    assert "new request coming before finishing" in d.log[-1]
    assert daemon_read(d) == ack(fw.HV_VSS_CHECK, MSGID)
    daemon_write(d, ack(fw.HV_VSS_CHECK, MSGID), 2.0)
    assert check.status == host.HV_S_OK and check.flags == host.VSS_HBU_NO_AUTO_RECOVERY
    d.tick(60.0)
    assert not freeze.done and not d.daemon.pollin


def test_get_dm_info_answered_by_the_kernel_unknown_operations_never():
    d = opened()
    dm = d.host_send(host.VSS_OP_GET_DM_INFO, 0.0)
    bu = d.host_send(host.VSS_OP_BU_COMPLETE, 0.0)
    d.tick(600.0)
    assert (dm.status, dm.answered_by) == (host.HV_S_OK, "kernel")
    assert not bu.done and d.log[-1] == "Unknown opt from host: 4"


def test_msgid_is_the_nanosecond_clock_and_read_moves_the_request_to_ack():
    d = opened()
    d.host_send(host.VSS_OP_FREEZE, 0.0)
    assert d.daemon.pollin
    assert d.read(d.daemon) == ack(fw.HV_VSS_FREEZE, MSGID)
    assert not d.daemon.pollin and len(d.daemon.ack) == 1


def test_read_with_nothing_pending_says_status_1_and_the_ioctl_succeeds():
    d = opened()
    buf = bytearray(b"\xff" * 64)  # kern_ioctl zeroes an IOC_OUT buffer first
    assert d.ioctl(d.daemon, fw.IOCHVVSSREAD, buf, 0.0) == 0
    assert bytes(buf) == NOTHING_PENDING


def test_late_ack_is_dropped_silently_and_the_callers_buffer_is_untouched():
    d = opened(chain_timeout=15.0)
    freeze = d.host_send(host.VSS_OP_FREEZE, 0.0)
    daemon_read(d)
    d.tick(15.0)
    assert (freeze.status, freeze.answered_by) == (host.HV_E_FAIL, "timeout")
    late = bytearray(ack(fw.HV_VSS_FREEZE, MSGID))
    assert d.ioctl(d.daemon, fw.IOCHVVSSWRITE, late, 16.0) == 0
    assert bytes(late) == ack(fw.HV_VSS_FREEZE, MSGID)  # IOC_IN: nothing copied back
    assert d.dropped_acks == [bytes(late)] and freeze.status == host.HV_E_FAIL


def test_daemon_status_is_a_u32_and_any_non_zero_fails():
    d = opened()
    check = d.host_send(host.VSS_OP_HOT_BACKUP, 0.0)
    daemon_read(d)
    daemon_write(d, ack(fw.HV_VSS_CHECK, MSGID, status=256), 1.0)
    assert (check.status, check.answered_by) == (host.HV_E_FAIL, "daemon")
    assert check.flags == host.VSS_HBU_NO_AUTO_RECOVERY


def test_an_opt_outside_the_three_leaves_the_request_to_its_timeout():
    d = opened()
    freeze = d.host_send(host.VSS_OP_FREEZE, 0.0)
    daemon_read(d)
    daemon_write(d, ack(7, MSGID), 1.0)
    assert "KASSERT: Mismatched VSS operation!" in d.log[-1] and not freeze.done
    d.tick(15.0)
    assert (freeze.status, freeze.answered_by) == (host.HV_E_FAIL, "timeout")
    assert "fail to find request" in " ".join(d.log)


def test_unknown_ioctl_returns_0_and_read_and_write_are_enodev():
    """hv_vss_dev_daemon_ioctl returns 0 whatever the command; hv_vss_cdevsw has no
    d_read or d_write, so devfs answers read(2) and write(2) with ENODEV."""
    d = opened()
    assert d.ioctl(d.daemon, 0xC0407699, bytearray(64), 0.0) == 0
    d.host_send(host.VSS_OP_FREEZE, 0.0)
    assert d.d_read(256, 0.0) == (-errno.ENODEV, b"")
    assert d.d_write(bytes(64), 0.0) == -errno.ENODEV
    assert d.daemon.pollin  # neither took the request
    assert d.d_ioctl(fw.IOCHVVSSWRITE, bytes(12), 0.0) == (-errno.EFAULT, b"")


def test_poll_says_pollin_alone_whatever_was_asked_and_never_hangs_up():
    """hv_vss_dev_daemon_poll returns POLLIN or 0, and pollscan (sys_generic.c) keeps
    the driver's revents as they are: no POLLRDNORM, even for a POLLRDNORM poller."""
    d = opened()
    for events in (select.POLLIN | select.POLLRDNORM, select.POLLRDNORM, select.POLLIN):
        assert d.d_poll(events) == 0
    d.host_send(host.VSS_OP_HOT_BACKUP, 0.0)
    for events in (select.POLLIN | select.POLLRDNORM, select.POLLRDNORM, select.POLLIN):
        assert d.d_poll(events) == select.POLLIN
    d.release(1.0)
    assert d.d_poll(select.POLLIN) == select.POLLIN  # the request stays; no POLLHUP


def test_a_request_that_timed_out_unread_is_gone_for_good():
    """hv_vss_timeout takes the request out of the notify queue: a daemon that reads
    only afterwards gets status VSS_FAIL (hv_vss_notified), nothing to do."""
    d = opened(chain_timeout=15.0)
    freeze = d.host_send(host.VSS_OP_FREEZE, 0.0)
    d.tick(15.0)
    assert (freeze.status, freeze.answered_by) == (host.HV_E_FAIL, "timeout")
    assert not d.daemon.pollin
    assert daemon_read(d, 16.0) == NOTHING_PENDING


def test_a_request_the_daemon_died_before_reading_waits_for_the_next_opener():
    """hv_vss_dev_close only clears register_done: the notify queue keeps the request,
    and the next daemon's IOCHVVSSREAD takes it, within the same 15-second budget."""
    d = opened(chain_timeout=15.0)
    check = d.host_send(host.VSS_OP_HOT_BACKUP, 0.0)
    d.release(1.0)  # died without reading
    assert d.host_send(host.VSS_OP_FREEZE, 2.0).answered_by == "kernel"  # dead: at once
    assert d.open() == 0
    assert daemon_read(d, 3.0) == ack(fw.HV_VSS_CHECK, MSGID)
    daemon_write(d, ack(fw.HV_VSS_CHECK, MSGID), 3.5)
    assert (check.status, check.answered_by) == (host.HV_S_OK, "daemon")


def test_one_budget_for_the_whole_chain_app_then_daemon():
    d = opened(chain_timeout=15.0)
    assert d.open_device(d.app) == 0
    freeze = d.host_send(host.VSS_OP_FREEZE, 0.0)
    assert d.app.pollin and not d.daemon.pollin  # the application is told first
    d.ioctl(d.app, fw.IOCHVVSSWRITE, bytearray(d.read(d.app)), 10.0)  # it held 10 s
    assert daemon_read(d) == ack(fw.HV_VSS_FREEZE, MSGID)
    d.tick(15.0)  # not re-armed at the hand-off: 5 s were left for the daemon
    daemon_write(d, ack(fw.HV_VSS_FREEZE, MSGID), 15.5)
    assert (freeze.status, freeze.answered_by) == (host.HV_E_FAIL, "timeout")
    assert d.dropped_acks


def test_application_veto_on_check_never_reaches_the_daemon():
    d = opened()
    d.open_device(d.app)
    check = d.host_send(host.VSS_OP_HOT_BACKUP, 0.0)
    assert d.read(d.app) == ack(fw.HV_VSS_CHECK, MSGID)
    d.ioctl(d.app, fw.IOCHVVSSWRITE, bytearray(ack(fw.HV_VSS_CHECK, MSGID, 1)), 1.0)
    assert (check.status, check.answered_by) == (host.HV_E_FAIL, "app")
    assert not d.daemon.pollin


def test_application_status_is_truncated_to_a_byte():
    d = opened()
    d.open_device(d.app)
    d.host_send(host.VSS_OP_HOT_BACKUP, 0.0)
    d.read(d.app)
    d.ioctl(d.app, fw.IOCHVVSSWRITE, bytearray(ack(fw.HV_VSS_CHECK, MSGID, 256)), 1.0)
    assert daemon_read(d) == ack(fw.HV_VSS_CHECK, MSGID)  # 256 counted as success


def test_thaw_goes_to_the_daemon_first_and_a_daemon_failure_skips_the_app():
    d = opened()
    d.open_device(d.app)
    thaw = d.host_send(host.VSS_OP_THAW, 0.0)
    assert d.daemon.pollin and not d.app.pollin
    assert d.read(d.daemon) == ack(fw.HV_VSS_THAW, MSGID)
    daemon_write(d, ack(fw.HV_VSS_THAW, MSGID, status=1), 1.0)
    assert (thaw.status, thaw.answered_by) == (host.HV_E_FAIL, "daemon")
    assert not d.app.pollin  # the application never hears of THAW

    thaw2 = d.host_send(host.VSS_OP_THAW, 2.0)
    d.read(d.daemon)
    daemon_write(d, ack(fw.HV_VSS_THAW, MSGID + 1), 3.0)
    assert not thaw2.done and d.app.pollin
    d.ioctl(d.app, fw.IOCHVVSSWRITE, bytearray(d.read(d.app)), 4.0)
    assert (thaw2.status, thaw2.answered_by) == (host.HV_S_OK, "app")


# --- our protocol code against the model: IoctlEndpoint, KernelChannel, Engine --------


class ModelIoctl:
    """Stands in for the fcntl module: ioctl() lands in the model's kern_ioctl."""

    def __init__(self, d: FreeBSDDriver) -> None:
        self.driver = d
        self.now = 0.0
        self.calls: list[tuple[int, bytes]] = []

    def ioctl(self, fd: int, cmd: int, arg: bytes | bytearray, mutate: bool = True) -> object:
        # As fcntl.ioctl: only a mutable buffer with mutate true is written in place;
        # otherwise a copy is, and returned.
        buf = arg if isinstance(arg, bytearray) and mutate else bytearray(arg)
        rc = self.driver.ioctl(self.driver.daemon, cmd, buf, self.now)
        self.calls.append((cmd, bytes(buf)))
        return rc if isinstance(arg, bytearray) and mutate else bytes(buf)


@pytest.fixture
def loop(monkeypatch):
    d = opened(chain_timeout=15.0)
    fake = ModelIoctl(d)
    monkeypatch.setattr(transport, "fcntl", fake)
    channel = KernelChannel(transport.IoctlEndpoint(-1), FREEBSD)
    return d, fake, channel, E.Engine(FREEBSD)


def serve(channel: KernelChannel, engine: E.Engine, fake: ModelIoctl,
          child: wire.Status = wire.Status.OK,
          meanwhile: Callable[[], None] | None = None) -> KernelRequest | None:
    """One turn of the service loop: READ, let the engine decide, WRITE the answer.
    `meanwhile` runs between the READ and the answer (time passing in the kernel)."""
    req = channel.read_request()
    if req is None:
        return None
    if meanwhile is not None:
        meanwhile()
    now = fake.now
    actions = engine.on_kernel(req, now)
    while actions:
        act = actions.pop(0)
        if isinstance(act, E.AskChild):
            res = wire.Result(act.op, child, 0, 0 if child is wire.Status.OK else errno.EIO, 1)
            actions += engine.on_child_result(res, now)
        elif isinstance(act, E.ReplyKernel):
            channel.reply(act.request, act.ok)
    return req


def test_protocol_loop_check_freeze_thaw(loop):
    d, fake, channel, engine = loop
    for op, opt in ((host.VSS_OP_HOT_BACKUP, 1), (host.VSS_OP_FREEZE, 2), (host.VSS_OP_THAW, 3)):
        sent = d.host_send(op, 0.0)
        assert d.daemon.pollin
        serve(channel, engine, fake)
        msgid = MSGID + opt - 1
        assert (sent.status, sent.answered_by) == (host.HV_S_OK, "daemon")
        assert sent.daemon_reply == ack(opt, msgid)
    codes = [cmd for cmd, _ in fake.calls]
    assert codes == [fw.IOCHVVSSREAD, fw.IOCHVVSSWRITE] * 3
    assert (fw.IOCHVVSSREAD, fw.IOCHVVSSWRITE) == (0x40407602, 0x80407603)


def test_protocol_loop_freeze_failure_answers_vss_fail(loop):
    d, fake, channel, engine = loop
    freeze = d.host_send(host.VSS_OP_FREEZE, 0.0)
    serve(channel, engine, fake, child=wire.Status.FAILED)
    assert (freeze.status, freeze.daemon_reply) == (host.HV_E_FAIL, ack(2, MSGID, status=1))


def test_protocol_loop_request_timed_out_between_poll_and_read(loop):
    d, fake, channel, engine = loop
    freeze = d.host_send(host.VSS_OP_FREEZE, 0.0)
    assert d.daemon.pollin  # poll() said POLLIN ...
    d.tick(15.0)  # ... and the callout fired before the READ
    fake.now = 15.1
    assert serve(channel, engine, fake) is None
    assert fake.calls == [(fw.IOCHVVSSREAD, NOTHING_PENDING)]  # nothing written back
    assert (freeze.status, freeze.answered_by) == (host.HV_E_FAIL, "timeout")
    assert not engine.busy and not engine.frozen


def test_protocol_loop_late_ack_succeeds_for_us_and_is_dropped_by_the_kernel(loop):
    d, fake, channel, engine = loop
    freeze = d.host_send(host.VSS_OP_FREEZE, 0.0)

    def freeze_takes_too_long() -> None:
        d.tick(15.0)
        fake.now = 16.0

    serve(channel, engine, fake, meanwhile=freeze_takes_too_long)  # the WRITE raises nothing
    assert fake.calls[-1] == (fw.IOCHVVSSWRITE, ack(2, MSGID))
    assert d.dropped_acks == [ack(2, MSGID)]
    assert (freeze.status, freeze.answered_by) == (host.HV_E_FAIL, "timeout")
    assert engine.frozen  # we cannot know; the host's THAW or the watchdog ends it
