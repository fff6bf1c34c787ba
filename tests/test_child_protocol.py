"""The real root child, driven through its socket as a compromised parent would.

Each case starts a fresh child restricted to one scratch filesystem, sends a
malformed or out-of-state frame, and checks: the child exits (status 2, a
protocol violation; 0 for EOF), and the filesystem is writable afterwards.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import select
import signal
import socket
import stat
import struct
import time

import pytest

from agent.engine.child_link import ChildGone, ChildLink
from privileged import protocol, wire
from privileged.child import EXIT_ERROR, EXIT_OK, EXIT_VIOLATION, REOPEN_BURST, REOPEN_EVERY
from privileged.wire import Op
from tests.helpers import assert_blocked, assert_writable, write_config


def spawn(workdir: str, mount: str, **config: object) -> ChildLink:
    cfg = write_config(os.path.join(workdir, "child.toml"), [mount], workdir, **config)  # type: ignore[arg-type]
    link = ChildLink.spawn(cfg, None)
    hello = link.wait_hello()
    assert hello.targets == 1
    return link


def req(op: int, seq: int, version: int = wire.VERSION, reserved: int = 0) -> bytes:
    return struct.pack("<BBHI", version, op, reserved, seq)


MALFORMED = {
    "short": req(Op.CHECK, 1)[:7],
    "long": req(Op.CHECK, 1) + b"\0",
    "oversized": b"\1" * 5000,
    "wrong version": req(Op.CHECK, 1, version=2),
    "unknown op": req(0x7F, 1),
    "child's own kind": req(wire.Kind.RESULT, 1),
    "reserved set": req(Op.CHECK, 1, reserved=1),
    "sequence skipped": req(Op.CHECK, 2),
    "sequence zero": req(Op.CHECK, 0),
    "THAW while thawed": req(Op.THAW, 1),
}


@pytest.mark.parametrize("frame", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_frame_ends_the_child_and_freezes_nothing(workdir, make_fs, frame):
    fs = make_fs("ext4")
    link = spawn(workdir, fs.mountpoint)
    link.sock.send(frame)
    assert link.exit_status(10) == EXIT_VIOLATION
    assert_writable(fs.mountpoint, 2)


def test_passed_descriptor_is_a_violation_and_is_closed(workdir, make_fs):
    """A descriptor passed with a request, while frozen: the child closes it, thaws and
    exits, and no process (a thaw guard included) is left holding it: the pipe's read end
    sees EOF once our own write end is closed too."""
    fs = make_fs("ext4")
    link = spawn(workdir, fs.mountpoint)
    assert link.request(Op.FREEZE)[0].status is wire.Status.OK
    r, w = os.pipe()
    link.sock.sendmsg([req(Op.THAW, 2)],
                      [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]).tobytes())])
    os.close(w)
    try:
        assert select.select([r], [], [], 10)[0], "someone still holds the passed descriptor"
        assert os.read(r, 1) == b""
    finally:
        os.close(r)
    assert link.exit_status(10) == EXIT_VIOLATION
    assert_writable(fs.mountpoint, 2)


def test_garbage_while_frozen_thaws_then_exits(workdir, make_fs):
    fs = make_fs("ext4")
    link = spawn(workdir, fs.mountpoint)
    res, _ = link.request(Op.FREEZE)
    assert res.status is wire.Status.OK and res.count == 1
    probe = assert_blocked(fs.mountpoint, 0.3)
    link.sock.send(b"garbage")
    assert probe.done_within(5)
    assert link.exit_status(10) == EXIT_VIOLATION


def test_second_freeze_while_frozen_is_a_violation(workdir, make_fs):
    fs = make_fs("ext4")
    link = spawn(workdir, fs.mountpoint)
    assert link.request(Op.FREEZE)[0].status is wire.Status.OK
    link.sock.send(req(Op.FREEZE, 2))
    assert link.exit_status(10) == EXIT_VIOLATION
    assert_writable(fs.mountpoint, 2)


def test_eof_while_frozen_thaws(workdir, make_fs):
    fs = make_fs("ext4")
    link = spawn(workdir, fs.mountpoint)
    assert link.request(Op.FREEZE)[0].status is wire.Status.OK
    probe = assert_blocked(fs.mountpoint, 0.3)
    link.close()
    assert probe.done_within(5)
    assert link.exit_status(10) == EXIT_OK


def test_well_formed_conversation(workdir, make_fs):
    fs = make_fs("ext4")
    link = spawn(workdir, fs.mountpoint)
    assert link.request(Op.PING)[0].status is wire.Status.OK
    check, _ = link.request(Op.CHECK)
    assert (check.status, check.count) == (wire.Status.OK, 1)
    freeze, _ = link.request(Op.FREEZE)
    assert (freeze.status, freeze.count) == (wire.Status.OK, 1)
    assert link.request(Op.PING)[0].count == 1
    thaw, _ = link.request(Op.THAW)
    assert (thaw.status, thaw.count) == (wire.Status.OK, 1)
    assert link.request(Op.QUIT)[0].status is wire.Status.OK
    assert link.exit_status(10) == EXIT_OK
    assert_writable(fs.mountpoint)


def test_reopen_without_a_device_fails_cleanly(workdir, make_fs):
    fs = make_fs("ext4")
    link = spawn(workdir, fs.mountpoint)
    res, fds = link.request(Op.REOPEN)
    assert res.status is wire.Status.FAILED and fds == []
    link.request(Op.QUIT)


def test_reopen_of_a_device_node_hands_the_parent_it_read_write(workdir, make_fs):
    """A real device node (here one with /dev/null's numbers): the parent writes replies
    to it, so what REOPEN passes is open for reading and writing, and is that node."""
    fs = make_fs("ext4")
    device = os.path.join(workdir, "vss-device")
    os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    config = write_config(os.path.join(workdir, "child.toml"), [fs.mountpoint], workdir)
    link = ChildLink.spawn(config, device)
    try:
        link.wait_hello()
        res, fds = link.request(Op.REOPEN)
        assert res.status is wire.Status.OK and len(fds) == 1
        try:
            st = os.fstat(fds[0])
            assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
            assert fcntl.fcntl(fds[0], fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        finally:
            os.close(fds[0])
        link.request(Op.QUIT)
    finally:
        link.close()
        link.exit_status(10)


def test_reopen_is_rate_limited(workdir, make_fs):
    """A parent reconnecting backs off; one asking REOPEN in a loop is refused (EAGAIN)."""
    fs = make_fs("ext4")
    cfg = write_config(os.path.join(workdir, "child.toml"), [fs.mountpoint], workdir)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(os.path.join(workdir, "vss.sock"))
    server.listen(16)
    link = ChildLink.spawn(cfg, os.path.join(workdir, "vss.sock"))
    link.wait_hello()

    def reopen() -> tuple[wire.Status, int, int]:
        res, fds = link.request(Op.REOPEN)
        for fd in fds:
            os.close(fd)
        return res.status, res.errno, len(fds)

    start = time.monotonic()  # before the burst: tokens come back from here on at most
    answers = [reopen() for _ in range(REOPEN_BURST + 3)]
    assert answers == [(wire.Status.OK, 0, 1)] * REOPEN_BURST + \
        [(wire.Status.REFUSED, errno.EAGAIN, 0)] * 3
    # One more every REOPEN_EVERY seconds: not yet at 0.6 of it, again after it.
    time.sleep(max(0.0, start + 0.6 * REOPEN_EVERY - time.monotonic()))
    assert reopen() == (wire.Status.REFUSED, errno.EAGAIN, 0)
    time.sleep(max(0.0, start + 1.3 * REOPEN_EVERY - time.monotonic()))
    assert reopen() == (wire.Status.OK, 0, 1)
    link.request(Op.QUIT)
    server.close()


def test_parent_sees_malformed_child_records_as_fatal():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    class FakeProc:
        pid = 0

    link = ChildLink(ours, FakeProc())  # type: ignore[arg-type]
    theirs.send(b"\x01\x99junk")
    with pytest.raises(ChildGone):
        link.receive()
    theirs.close()
    with pytest.raises(ChildGone):
        link.receive()


def test_what_a_child_sent_before_it_went_is_still_logged(caplog):
    """The parent may learn that the child is gone from a failed send (EPIPE) while the
    child's last lines (why it exited, what it thawed) still wait in the socket."""
    caplog.set_level(logging.INFO, logger="hv-vss-agent.child")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    class FakeProc:
        pid = 0

    link = ChildLink(ours, FakeProc())  # type: ignore[arg-type]
    theirs.send(protocol.log(protocol.WARNING, "automatic THAW of 2 filesystem(s) (signal)"))
    theirs.send(protocol.log(protocol.INFO, "stopping on signal 15"))
    theirs.close()
    with pytest.raises(ChildGone):
        link.send(Op.THAW)
    assert [r.getMessage() for r in caplog.records if r.name == "hv-vss-agent.child"] == [
        "[child] automatic THAW of 2 filesystem(s) (signal)", "[child] stopping on signal 15"]
    link.close()


def test_child_lets_go_of_its_stdio_once_it_runs(workdir, make_fs):
    """Whatever stdio the parent handed over (here a log file) is let go: a write to it
    while frozen would block the one process that can thaw.  On Linux 0-2 are closed
    (the socket is its only descriptor); FreeBSD puts /dev/null there."""
    fs = make_fs("ext4")
    link = spawn(workdir, fs.mountpoint)
    try:
        assert not {"0", "1", "2"} & set(os.listdir(f"/proc/{link.pid}/fd"))
    finally:
        link.request(Op.QUIT)


def test_a_parent_that_stops_reading_never_blocks_the_child(workdir, make_fs, monkeypatch):
    """Frozen, with the parent reading nothing and its socket full: the watchdog thaws, its
    notice to the parent is dropped rather than waited on, and SIGTERM still ends the child
    at once (a child blocked in a send would retry it after every signal, for ever)."""
    fs = make_fs("ext4")
    theirs: list[socket.socket] = []
    pair = socket.socketpair

    def keeping_a_copy(*args: int) -> tuple[socket.socket, socket.socket]:
        ours, child_end = pair(*args)
        theirs.append(child_end.dup())  # the child's end, to fill from here
        return ours, child_end

    monkeypatch.setattr(socket, "socketpair", keeping_a_copy)
    link = spawn(workdir, fs.mountpoint, max_frozen=1.0)
    monkeypatch.undo()
    filler = theirs[0]
    try:
        assert link.request(Op.FREEZE)[0].status is wire.Status.OK
        probe = assert_blocked(fs.mountpoint, 0.2)
        with pytest.raises(BlockingIOError):  # (not setblocking: the file's flags are shared)
            for _ in range(100_000):  # the child's send buffer, charged to the socket it shares
                filler.send(b"\0" * 1024, socket.MSG_DONTWAIT)
        assert probe.done_within(10)  # the watchdog thawed
        os.kill(link.pid, signal.SIGTERM)
        assert link.exit_status(5) == EXIT_OK
    finally:
        filler.close()
        link.close()
        if link.exit_status(0) is None:
            link.proc.kill()
            link.exit_status(5)
    assert_writable(fs.mountpoint, 2)


def test_a_child_running_as_root_refuses_the_in_memory_freezer(workdir, make_fs):
    """The demo's stand-in freezes nothing and answers as if it had: a root child asked for
    it does not start, rather than pretend to the host that a backup is consistent."""
    fs = make_fs("ext4")
    cfg = write_config(os.path.join(workdir, "child.toml"), [fs.mountpoint], workdir)
    link = ChildLink.spawn(cfg, None, extra=("--memory",))
    try:
        msg, _ = link.receive()
        assert isinstance(msg, wire.Log) and "in-memory freezer is refused to root" in msg.text
        assert link.exit_status(10) == EXIT_ERROR
    finally:
        link.close()
