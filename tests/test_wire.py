"""privileged/wire.py: exact layouts, strict decoding, no I/O."""

from __future__ import annotations

import struct

import pytest

from privileged import protocol, wire
from privileged.wire import Kind, Op, Status, WireError


@pytest.mark.parametrize("op", list(Op))
def test_request_round_trip_and_size(op):
    frame = wire.encode_request(wire.Request(op, 7))
    assert len(frame) == 8
    assert wire.decode_request(frame) == wire.Request(op, 7)


@pytest.mark.parametrize("op", list(Op))
@pytest.mark.parametrize("length", [0, 1, 7, 9, 16, 216, 1030])
def test_every_wrong_length_is_rejected(op, length):
    frame = (wire.encode_request(wire.Request(op, 1)) * 200)[:length]
    with pytest.raises(WireError):
        wire.decode_request(frame)


@pytest.mark.parametrize("bad", [
    struct.pack("<BBHI", 0, Op.CHECK, 0, 1),  # version 0
    struct.pack("<BBHI", 2, Op.CHECK, 0, 1),  # version 2
    struct.pack("<BBHI", 1, 0, 0, 1),  # op 0
    struct.pack("<BBHI", 1, 7, 0, 1),  # op beyond the last
    struct.pack("<BBHI", 1, Kind.LOG, 0, 1),  # a child's kind sent as a request
    struct.pack("<BBHI", 1, Op.PING, 1, 1),  # reserved not zero
])
def test_bad_request_fields_are_rejected(bad):
    with pytest.raises(WireError):
        wire.decode_request(bad)


def test_result_round_trip_and_exact_size():
    res = wire.Result(Op.FREEZE, Status.FAILED, 9, 5, 2, 1234, "/mnt/café")
    frame = wire.encode_result(res)
    assert len(frame) == wire.RESULT.size == 216
    assert wire.decode_child(frame) == res
    with pytest.raises(WireError):
        wire.decode_child(frame + b"\0")
    with pytest.raises(WireError):
        wire.decode_child(frame[:-1])


def test_result_mount_is_clipped_on_a_character_boundary():
    res = wire.Result(Op.FREEZE, Status.FAILED, 1, mount="/" + "é" * 150)
    decoded = wire.decode_child(wire.encode_result(res))
    assert isinstance(decoded, wire.Result)
    assert len(decoded.mount.encode()) <= wire.MOUNT_FIELD
    assert decoded.mount.startswith("/éé")


def test_what_a_freeze_froze_is_a_list_whatever_its_names_hold():
    """NUL between the names: a comma or a space inside one is part of it."""
    names = ["/srv/db, logs", "/srv/a b"]
    frame = protocol.result(Op.FREEZE, Status.OK, 3, err=0, count=2, elapsed_us=1,
                            mount="\0".join(names))
    decoded = wire.decode_child(frame)
    assert isinstance(decoded, wire.Result)
    assert decoded.mounts == tuple(names)


def test_names_that_do_not_fit_are_left_out_whole_and_counted():
    """The field holds 200 bytes: a name cut by it is left out, never shown cut."""
    names = [f"/srv/{i:02d}" + "x" * 40 for i in range(6)]  # 48 bytes each, 4 fit whole
    frame = protocol.result(Op.FREEZE, Status.OK, 3, err=0, count=6, elapsed_us=1,
                            mount="\0".join(names))
    decoded = wire.decode_child(frame)
    assert isinstance(decoded, wire.Result)
    assert decoded.mounts == tuple(names[:4]) and decoded.count == 6


def test_event_and_hello_round_trip():
    ev = wire.Event(wire.EventCode.AUTO_THAW, wire.Reason.WATCHDOG, 3)
    assert wire.decode_child(wire.encode_event(ev)) == ev
    hello = wire.Hello(4242, 2, 1)
    assert wire.decode_child(wire.encode_hello(hello)) == hello


def test_a_hello_names_at_most_255_devices_and_counts_every_target():
    """The largest record either side sends (MAX_RECORD, what receivers size their buffer
    for) is a HELLO naming 255 devices: a child with more targets names the first 255 and
    still counts them all."""
    hello = wire.decode_child(wire.encode_hello(wire.Hello(1, 300, 0, tuple(range(300)))))
    assert isinstance(hello, wire.Hello)
    assert (hello.targets, hello.devices) == (300, tuple(range(255)))
    assert wire.HELLO.size + 8 * 255 == protocol.MAX_RECORD


def test_counts_beyond_sixteen_bits_are_sent_as_the_largest_there_is():
    """The HELLO's and EVENT's counts and RESULT's errno and count are 16-bit fields: more is
    sent as 65535 (RESULT's elapsed time, 32 bits, likewise), never an encoding error in the
    child."""
    hello = wire.decode_child(wire.encode_hello(wire.Hello(1, 70000, 65536)))
    assert isinstance(hello, wire.Hello) and (hello.targets, hello.recovered) == (65535, 65535)
    event = wire.decode_child(wire.encode_event(
        wire.Event(wire.EventCode.AUTO_THAW, wire.Reason.WATCHDOG, 65536)))
    assert isinstance(event, wire.Event) and event.count == 65535
    result = wire.decode_child(protocol.result(Op.FREEZE, Status.FAILED, 1, err=1 << 20,
                                               count=1 << 20, elapsed_us=1 << 40, mount=""))
    assert isinstance(result, wire.Result)
    assert (result.errno, result.count, result.elapsed_us) == (65535, 65535, 0xFFFFFFFF)


def test_log_frames_are_bounded_and_exact():
    frame = wire.encode_log(30, "x" * 5000)
    assert len(frame) == wire.LOG_HEADER.size + wire.MAX_LOG_TEXT
    msg = wire.decode_child(frame)
    assert msg == wire.Log(30, "x" * wire.MAX_LOG_TEXT)
    assert wire.decode_child(wire.encode_log(20, "")) == wire.Log(20, "-")  # never empty


@pytest.mark.parametrize("bad", [
    struct.pack("<BBBBH", 1, Kind.LOG, 25, 0, 1) + b"x",  # level not a logging level
    struct.pack("<BBBBH", 1, Kind.LOG, 20, 0, 2) + b"x",  # length says 2, one byte follows
    struct.pack("<BBBBH", 1, Kind.LOG, 20, 0, 0),  # empty text
    struct.pack("<BBBBH", 1, Kind.LOG, 20, 1, 1) + b"x",  # reserved set
    struct.pack("<BBBBH", 1, Kind.LOG, 20, 0, 1) + b"\xff",  # not UTF-8
    struct.pack("<BBBBH", 1, Kind.LOG, 20, 0, 1025) + b"x" * 1025,  # over the bound
    b"\x01",  # too short for anything
    b"\x02\x81" + bytes(214),  # wrong version
    b"\x01\x99" + bytes(214),  # unknown kind
    struct.pack("<BBBBHH", 1, Kind.EVENT, 9, 1, 0, 0),  # unknown event code
    struct.pack("<BBBBHH", 1, Kind.EVENT, 1, 9, 0, 0),  # unknown reason
    struct.pack("<BBHIHH", 1, Kind.HELLO, 1, 1, 0, 0),  # reserved set
])
def test_malformed_child_records_are_rejected(bad):
    with pytest.raises(WireError):
        wire.decode_child(bad)


def test_requests_and_child_kinds_never_overlap():
    assert max(Op) < 0x80 <= min(Kind)
