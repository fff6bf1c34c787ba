"""The subscriber protocol and the engine <-> frontend records: every byte checked."""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.engine.frontend_link import FrontendLink
from agent.protocols import frontend as fw
from agent.protocols import notify as nw
from agent.protocols.verb import Verb

GOOD_SUBSCRIBER_LINES = [
    (b"HELLO 1 pgsql\n", nw.Hello(1, "pgsql")),
    (b"HELLO 1 my.app-2 5000\n", nw.Hello(1, "my.app-2", 5000)),
    (b"OK FREEZE 7\n", nw.Answer(nw.Verdict.OK, Verb.FREEZE, 7)),
    (b"OK THAW 0\n", nw.Answer(nw.Verdict.OK, Verb.THAW, 0)),
    (b"VETO CHECK 3 backup window closed\n",
     nw.Answer(nw.Verdict.VETO, Verb.CHECK, 3, "backup window closed")),
    (b"FAIL FREEZE 9 disk full\r\n", nw.Answer(nw.Verdict.FAIL, Verb.FREEZE, 9, "disk full")),
]

BAD_SUBSCRIBER_LINES = [
    b"\n", b"HELLO\n", b"HELLO 1\n", b"HELLO one pgsql\n", b"HELLO 1 -dash-first\n",
    b"HELLO 1 " + b"n" * 65 + b"\n", b"HELLO 1 pgsql 0\n", b"HELLO 1 pgsql 5000 extra\n",
    b"HELLO 1 pg sql\n", b"OK FREEZE\n", b"OK FREEZE 7 extra\n", b"OK FREEZE +7\n",
    b"OK FREEZE 4294967296\n", b"OK SNAPSHOT 7\n", b"VETO FREEZE 7 no\n", b"VETO CHECK 7\n",
    b"FAIL THAW 7\n", b"MAYBE CHECK 7\n", b"ok FREEZE 7\n", b"OK  FREEZE 7\n",
    b"OK FREEZE 7\xff\n", b"OK FREEZE " + b"1" * 600 + b"\n",
]


@pytest.mark.parametrize(("line", "msg"), GOOD_SUBSCRIBER_LINES)
def test_subscriber_lines_decode(line, msg):
    assert nw.decode_subscriber_line(line) == msg


@pytest.mark.parametrize("line", BAD_SUBSCRIBER_LINES)
def test_bad_subscriber_lines_are_protocol_errors(line):
    with pytest.raises(nw.NotifyProtocolError):
        nw.decode_subscriber_line(line)


def test_encoders_and_decoders_agree_both_ways():
    for _, msg in GOOD_SUBSCRIBER_LINES:
        data = (nw.encode_hello(msg) if isinstance(msg, nw.Hello) else nw.encode_answer(msg))
        assert nw.decode_subscriber_line(data) == msg
    for msg, data in [(nw.Greeting(1), nw.encode_greeting()), (nw.Welcome(4), nw.encode_welcome(4)),
                      (nw.Refused("not allowed"), nw.encode_refused("not allowed")),
                      (nw.Notice(Verb.FREEZE, 12, 9800),
                       nw.encode_notice(nw.Notice(Verb.FREEZE, 12, 9800))),
                      (nw.Error("bad"), nw.encode_error("bad"))]:
        assert nw.decode_agent_line(data) == msg
    with pytest.raises(nw.NotifyProtocolError):
        nw.encode_answer(nw.Answer(nw.Verdict.VETO, Verb.FREEZE, 1, "no"))
    with pytest.raises(nw.NotifyProtocolError):
        nw.encode_hello(nw.Hello(1, "bad name"))


def test_reasons_cannot_forge_log_lines():
    answer = nw.decode_subscriber_line(b"FAIL FREEZE 1 oops\rFAKE: root logged in\x1b[2J\n")
    assert answer.reason == "oops?FAKE: root logged in?[2J"
    assert len(nw.clean_reason("x" * 1000)) == nw.MAX_REASON


@pytest.mark.parametrize("split", ["whole", "bytewise", "trailing"])
def test_line_buffer_gives_the_same_lines_however_the_bytes_arrive(split):
    stream = b"HELLO 1 a\nOK CHECK 1\nFAIL FREEZE 2 x y\n"
    buf = nw.LineBuffer()
    if split == "whole":
        lines = buf.feed(stream)
    elif split == "bytewise":
        lines = [line for i in range(len(stream)) for line in buf.feed(stream[i:i + 1])]
    else:
        lines = buf.feed(stream + b"OK TH")
        assert buf.feed(b"AW 3\n") == [b"OK THAW 3\n"]
    assert lines == [b"HELLO 1 a\n", b"OK CHECK 1\n", b"FAIL FREEZE 2 x y\n"]


def test_line_buffer_never_holds_more_than_a_line():
    buf = nw.LineBuffer()
    buf.feed(b"x" * (nw.MAX_LINE - 1))
    with pytest.raises(nw.NotifyProtocolError):
        buf.feed(b"x")
    with pytest.raises(nw.NotifyProtocolError):
        nw.LineBuffer().feed(b"y" * 600 + b"\n")


# --- engine <-> frontend ---------------------------------------------------------------

DONE = fw.Done(Verb.FREEZE, 42, (
    fw.SubscriberResult("pgsql", 101, 2000, fw.Outcome.OK, "", 12),
    fw.SubscriberResult("hook-x", 0, 2001, fw.Outcome.FAILED, "exit status 3: disk full", 900),
    fw.SubscriberResult("slow", 65534, 2002, fw.Outcome.TIMEOUT, "", 10000),
))


def test_done_round_trips():
    assert fw.decode_frontend(fw.encode_done(DONE)) == DONE
    empty = fw.Done(Verb.THAW, 0, ())
    assert fw.decode_frontend(fw.encode_done(empty)) == empty


def test_every_truncation_and_extension_of_done_is_rejected():
    data = fw.encode_done(DONE)
    for n in range(len(data)):
        with pytest.raises(fw.WireError):
            fw.decode_frontend(data[:n])
    with pytest.raises(fw.WireError):
        fw.decode_frontend(data + b"\0")


@pytest.mark.parametrize(("offset", "value"), [
    (0, 2),  # version
    (1, fw.Kind.NOTIFY),  # the engine's record, not the frontend's
    (2, 9),  # event
    (3, 1),  # reserved
    (10, 7),  # outcome of the first entry
    (11, 0),  # name length 0
    (11, 65),  # name length beyond the limit
])
def test_done_fields_out_of_range_are_rejected(offset, value):
    data = bytearray(fw.encode_done(DONE))
    data[offset] = value
    with pytest.raises(fw.WireError):
        fw.decode_frontend(bytes(data))


def test_done_names_and_reasons_are_checked():
    bad_name = bytearray(fw.encode_done(DONE))
    first_name = fw.DONE.size + fw.ENTRY.size
    bad_name[first_name] = ord(" ")
    with pytest.raises(fw.WireError):
        fw.decode_frontend(bytes(bad_name))
    raw = fw.DONE.pack(1, fw.Kind.DONE, 2, 0, 1, 1) + fw.ENTRY.pack(0, 1, 2, 0, 0, 0) + b"a\n\x1b"
    with pytest.raises(fw.WireError):
        fw.decode_frontend(raw)
    too_many = fw.DONE.pack(1, fw.Kind.DONE, 2, 0, 1, fw.MAX_SUBSCRIBERS + 1)
    with pytest.raises(fw.WireError):
        fw.decode_frontend(too_many)


def test_hearing_is_exactly_four_bytes_with_a_bounded_count():
    assert fw.encode_hearing(fw.Hearing(3)) == b"\x01\x82\x03\x00"
    for n in (0, fw.MAX_SUBSCRIBERS):
        assert fw.decode_frontend(fw.encode_hearing(fw.Hearing(n))) == fw.Hearing(n)
    with pytest.raises(fw.WireError):
        fw.encode_hearing(fw.Hearing(fw.MAX_SUBSCRIBERS + 1))
    for bad in (b"\x01\x82\x03", b"\x01\x82\x03\x00\x00",
                fw.HEARING.pack(1, fw.Kind.HEARING, fw.MAX_SUBSCRIBERS + 1)):
        with pytest.raises(fw.WireError):
            fw.decode_frontend(bad)
    with pytest.raises(fw.WireError):  # only the frontend says it
        fw.decode_engine(fw.encode_hearing(fw.Hearing(1)))


@given(st.binary(max_size=400))
def test_decoding_arbitrary_bytes_either_succeeds_or_is_a_wire_error(data):
    for decode in (fw.decode_frontend, fw.decode_engine):
        try:
            decode(data)
        except fw.WireError:
            pass


def test_engine_records():
    assert fw.decode_engine(fw.encode_notify(fw.Notify(Verb.CHECK, 5, 1500))) == \
        fw.Notify(Verb.CHECK, 5, 1500)
    assert fw.decode_engine(fw.encode_status(b'{"state":"thawed"}')) == \
        fw.StatusUpdate(True, b'{"state":"thawed"}')
    assert fw.decode_engine(fw.encode_status(b'{"set":{}}', whole=False)) == \
        fw.StatusUpdate(False, b'{"set":{}}')
    with pytest.raises(fw.WireError):
        fw.encode_status(b"x" * (fw.MAX_STATUS + 1))
    with pytest.raises(fw.WireError):
        fw.decode_engine(fw.encode_done(DONE))


def test_a_status_too_large_for_one_record_loses_its_oldest_transactions():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (ours, theirs):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    link = FrontendLink(ours, SimpleNamespace(pid=1))  # type: ignore[arg-type]
    txs = [{"id": i, "detail": "x" * 1000} for i in range(500)]
    link.publish({"state": "thawed", "transactions": txs})
    got = json.loads(fw.decode_engine(theirs.recv(fw.MAX_RECORD + 1)).json)  # type: ignore[union-attr]
    assert got["transactions_trimmed"] is True
    assert got["transactions"][-1]["id"] == 499  # the newest are kept
    assert 0 < len(got["transactions"]) < 500
    ours.close()
    theirs.close()


_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                       lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=6)
_tx = st.builds(lambda i, v: {"id": i, "v": v}, st.integers(0, 20), _values)
_status = st.builds(
    lambda top, txs, has: {**top, **({"transactions": list({t["id"]: t for t in txs}.values())}
                                     if has else {})},
    st.dictionaries(st.sampled_from(["state", "time", "busy", "counters", "x"]), _values),
    st.lists(_tx, max_size=8), st.booleans())


@given(_status, _status)
def test_changes_turn_the_old_status_into_the_new_one(old, new):
    changes = json.loads(json.dumps(fw.make_changes(old, new)))  # as the frontend gets them
    assert fw.apply_changes(json.loads(json.dumps(old)), changes) == json.loads(json.dumps(new))


def _link() -> tuple[FrontendLink, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return FrontendLink(ours, SimpleNamespace(pid=1)), theirs  # type: ignore[arg-type]


def test_after_a_whole_status_only_what_changed_is_sent():
    link, theirs = _link()
    txs = [{"id": i, "detail": "x" * 200} for i in range(50)]
    link.publish({"state": "thawed", "time": 1.0, "transactions": txs})
    first = fw.decode_engine(theirs.recv(fw.MAX_RECORD + 1))
    assert isinstance(first, fw.StatusUpdate) and first.whole
    link.publish({"state": "thawed", "time": 2.0,
                  "transactions": [*txs[1:], {"id": 50, "detail": "new"}]})
    second = fw.decode_engine(theirs.recv(fw.MAX_RECORD + 1))
    assert isinstance(second, fw.StatusUpdate) and not second.whole
    assert len(second.json) < len(first.json) / 20
    mirror = fw.apply_changes(json.loads(first.json), json.loads(second.json))
    assert mirror == {"state": "thawed", "time": 2.0,
                      "transactions": [*txs[1:], {"id": 50, "detail": "new"}]}
    link.sock.close()
    theirs.close()


def test_a_dropped_update_makes_the_next_one_whole():
    link, theirs = _link()
    link.publish({"state": "thawed", "n": 0})
    assert fw.decode_engine(theirs.recv(fw.MAX_RECORD + 1)).whole  # type: ignore[union-attr]
    link.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    n = 0
    while link.sent is not None:  # the frontend does not read: updates are dropped
        n += 1
        link.publish({"state": "thawed", "n": n, "pad": "p" * 2000})
    while True:  # it reads everything again
        theirs.setblocking(False)
        try:
            theirs.recv(fw.MAX_RECORD + 1)
        except BlockingIOError:
            break
    link.publish({"state": "frozen", "n": n + 1})
    got = fw.decode_engine(theirs.recv(fw.MAX_RECORD + 1))
    assert isinstance(got, fw.StatusUpdate) and got.whole
    assert json.loads(got.json) == {"state": "frozen", "n": n + 1}
    link.sock.close()
    theirs.close()
