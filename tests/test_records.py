"""privileged/records.py, the record layer of every link: one record per call, strictly."""

from __future__ import annotations

import os
import select
import socket
import struct

import pytest

from privileged import records


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield a, b
    a.close()
    b.close()


def held_elsewhere(r: int, w: int) -> bool:
    """After we close our write end `w`: does anyone still hold it (no EOF on `r`)?"""
    os.close(w)
    try:
        return not select.select([r], [], [], 2)[0] or os.read(r, 1) != b""
    finally:
        os.close(r)


def test_a_record_and_its_descriptor(pair):
    a, b = pair
    r, w = os.pipe()
    assert records.send(a, b"hello", (w,))
    data, fds = records.receive(b, 100, max_fds=1)
    assert data == b"hello" and len(fds) == 1
    assert not os.get_inheritable(fds[0])  # arrived close-on-exec
    os.close(fds[0])
    assert not held_elsewhere(r, w)


def test_end_of_file_is_an_empty_record(pair):
    a, b = pair
    a.close()
    assert records.receive(b, 100) == (b"", [])


@pytest.mark.parametrize("size", [101, 5000])
def test_an_oversized_record_is_refused_never_half_read(pair, size):
    a, b = pair
    a.send(b"x" * size)
    with pytest.raises(records.RecordError, match="oversized"):
        records.receive(b, 100)


def test_descriptors_beyond_the_allowance_are_refused_and_closed(pair):
    a, b = pair
    r, w = os.pipe()
    records.send(a, b"req", (w, w))
    with pytest.raises(records.RecordError, match="2 passed descriptor"):
        records.receive(b, 100, max_fds=1)
    assert not held_elsewhere(r, w)  # the receiver closed both copies before it raised


def test_a_descriptor_with_an_empty_record_is_closed(pair):
    a, b = pair
    r, w = os.pipe()
    a.sendmsg([b""], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", w))])
    assert records.receive(b, 100, max_fds=1) == (b"", [])
    assert not held_elsewhere(r, w)


def test_credentials_are_ancillary_data_too(pair):
    a, b = pair
    b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    a.send(b"who")
    with pytest.raises(records.RecordError, match="not descriptors"):
        records.receive(b, 100, max_fds=4)


def test_credentials_beside_a_descriptor_are_refused_and_the_descriptor_closed(pair):
    a, b = pair
    b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    r, w = os.pipe()
    records.send(a, b"req", (w,))
    with pytest.raises(records.RecordError, match="not descriptors"):
        records.receive(b, 100, max_fds=4)
    assert not held_elsewhere(r, w)


def test_a_reset_hides_nothing_a_parent_reads_but_is_eof_to_the_child(pair):
    """The peer wrote two records and closed with one of ours unread: the kernel reports
    ECONNRESET first.  drain (the parent) reads on; the child takes it as EOF."""
    a, b = pair
    c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for peer, us in ((a, b), (c, d)):
        peer.send(b"one")
        peer.send(b"two")
        us.send(b"unread")
        peer.close()
    assert [records.receive(b, 100)[0] for _ in range(3)] == [b"one", b"two", b""]
    assert records.receive(d, 100, drain=False) == (b"", [])
    d.close()


def test_a_full_peer_is_never_waited_for_unless_asked(pair):
    a, _b = pair
    sent = 0
    while records.send(a, b"x" * 1000, block=False):
        sent += 1
    assert sent > 0  # and the last one returned False at once instead of blocking
