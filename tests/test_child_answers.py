"""What the real root child answers, seen as bytes on its socket and as frozen filesystems.

These tests speak to the child through its socket only, with the numbers and layouts the
protocol documents (in privileged/, where the records are declared) spelled out here, not
taken from the code under test: a request is `<BBHI` (version 1, op, 0, seq), an answer
`<BBBBIHHI200s` (version, kind 0x81, op, status, seq, errno, count, elapsed_us, mount).
Status 0 is OK,
1 FAILED, 2 REFUSED: were FAILED to become 0, the parent would tell the host that a
failed FREEZE succeeded.  The child decides what to freeze and in which order from its
config and the mount table; the order is what its FREEZE answer lists, and where the
wrong order would deadlock (a loop device backed by a file on a filesystem frozen
first) the watchdog's short window ends it.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from agent.dev import scratch
from agent.engine.child_link import ChildGone, ChildLink
from privileged import freeze_linux
from privileged.freeze_linux import LinuxFreezer
from tests.helpers import (
    assert_blocked,
    assert_writable,
    cli,
    shutdown_ext4,
    wait_for,
    write_config,
)

REQUEST = struct.Struct("<BBHI")
RESULT = struct.Struct("<BBBBIHHI200s")
VERSION = 1
CHECK, FREEZE, THAW, QUIT, REOPEN = 1, 2, 3, 5, 6
RESULT_KIND, HELLO_KIND, LOG_KIND = 0x81, 0x83, 0x84
OK, FAILED, REFUSED = 0, 1, 2
EVENT = struct.Struct("<BBBBHH")  # version, kind 0x82, code 1 (auto-thaw), why, count, 0
EVENT_KIND, AUTO_THAW, WATCHDOG = 0x82, 1, 1


class RawChild:
    """The real child, started as the parent starts it, spoken to in bytes."""

    def __init__(self, config: str, debug: bool = False) -> None:
        self.link = ChildLink.spawn(config, None, debug)
        self.sock = self.link.sock
        self.seq = 0
        self.logs: list[str] = []

    def record(self, timeout: float = 20.0) -> bytes:
        """The next record that is not a LOG line."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(8192)
            if not data:
                raise EOFError("the child closed its socket")
            assert data[0] == VERSION, data
            if data[1] == LOG_KIND:
                self.logs.append(data[6:].decode(errors="replace"))
                continue
            return data

    def hello(self) -> bytes:
        data = self.record()
        assert data[1] == HELLO_KIND and len(data) >= 12, data
        return data

    def ask(self, op: int, timeout: float = 20.0) -> tuple[int, int, int, str]:
        """(status, errno, count, mount) of the answer to `op`."""
        self.seq += 1
        self.sock.send(REQUEST.pack(VERSION, op, 0, self.seq))
        data = self.record(timeout)
        assert len(data) == RESULT.size, data
        _, kind, answered, status, seq, err, count, _, mount = RESULT.unpack(data)
        assert (kind, answered, seq) == (RESULT_KIND, op, self.seq), data
        return status, err, count, mount.rstrip(b"\0").decode()

    def close(self) -> int | None:
        """QUIT, its answer read, then the child's exit status."""
        try:
            if self.link.proc.poll() is None:
                self.ask(QUIT, timeout=10)
        except (OSError, EOFError, AssertionError):
            pass
        self.link.close()
        code = self.link.exit_status(10)
        if code is None:
            self.link.proc.kill()
            self.link.proc.wait()
        return code


@pytest.fixture
def raw_child() -> Iterator[list[RawChild]]:
    started: list[RawChild] = []
    try:
        yield started
    finally:
        for child in started:
            child.close()


def start(started: list[RawChild], config: str, debug: bool = False) -> RawChild:
    child = RawChild(config, debug)
    started.append(child)
    child.hello()
    return child


def test_answers_carry_the_documented_numbers(workdir, make_fs, raw_child):
    fs = make_fs("ext4")
    child = start(raw_child, write_config(os.path.join(workdir, "c.toml"), [fs.mountpoint],
                                          workdir))
    assert child.ask(CHECK) == (OK, 0, 1, "")
    assert child.ask(FREEZE) == (OK, 0, 1, fs.mountpoint)
    assert_blocked(fs.mountpoint)
    assert child.ask(THAW) == (OK, 0, 1, "")
    assert_writable(fs.mountpoint, 5)
    # no device on its command line: REOPEN tried and failed
    assert child.ask(REOPEN)[:3] == (FAILED, errno.ENODEV, 0)
    assert child.close() == 0


def test_the_watchdog_s_thaw_is_told_in_the_documented_numbers(workdir, make_fs, raw_child):
    fs = make_fs("ext4")
    child = start(raw_child, write_config(os.path.join(workdir, "c.toml"), [fs.mountpoint],
                                          workdir, max_frozen=0.5))
    assert child.ask(FREEZE) == (OK, 0, 1, fs.mountpoint)
    assert child.record(10) == EVENT.pack(VERSION, EVENT_KIND, AUTO_THAW, WATCHDOG, 1, 0)
    assert_writable(fs.mountpoint, 5)
    assert child.ask(THAW) == (OK, 0, 0, "")  # the parent catching up: answered, not punished


def test_eof_while_frozen_thaws_and_the_child_says_how_many_on_its_way_out(
        workdir, make_fs, raw_child):
    """The parent's end closed for writing only: the child sees EOF, thaws, and its last
    words still reach us."""
    fs = make_fs("ext4")
    child = start(raw_child, write_config(os.path.join(workdir, "c.toml"), [fs.mountpoint],
                                          workdir))
    assert child.ask(FREEZE) == (OK, 0, 1, fs.mountpoint)
    child.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(EOFError):
        child.record(10)
    assert child.link.exit_status(10) == 0
    assert_writable(fs.mountpoint, 5)
    assert "thawed 1 filesystem(s) on the way out" in child.logs, child.logs


def test_a_vetoed_freeze_is_refused_at_once_and_freezes_nothing(workdir, make_fs, raw_child):
    """A [freeze] only entry that is not a mounted filesystem vetoes: CHECK and FREEZE are
    answered REFUSED (EPERM, naming it), at once, and nothing is frozen."""
    fs = make_fs("ext4")
    missing = os.path.join(workdir, "not-mounted")
    os.mkdir(missing)
    child = start(raw_child, write_config(os.path.join(workdir, "c.toml"),
                                          [fs.mountpoint, missing], workdir))
    assert child.ask(CHECK)[:2] == (REFUSED, errno.EPERM)
    assert child.ask(FREEZE, timeout=5) == (REFUSED, errno.EPERM, 0, missing)
    assert_writable(fs.mountpoint, 5)
    # still thawed: a second FREEZE is permitted (in the frozen state it would end the child)
    assert child.ask(FREEZE, timeout=5)[0] == REFUSED
    assert child.close() == 0


# --- the order of a freeze, where the order of mounting would get it wrong ---------------


def bind(source: str, target: str, binds: list[str]) -> str:
    os.makedirs(target, exist_ok=True)
    subprocess.run(["mount", "--bind", source, target], check=True, capture_output=True,
                   timeout=30)
    binds.append(target)
    return target


@pytest.fixture
def binds() -> Iterator[list[str]]:
    made: list[str] = []
    try:
        yield made
    finally:
        for target in reversed(made):
            while scratch.thaw(target):
                pass
            subprocess.run(["umount", target], check=False, capture_output=True)
            if os.path.ismount(target):
                subprocess.run(["umount", "-l", target], check=False, capture_output=True)


def frozen_in_order(child: RawChild, expected: list[str], *, ordered: bool = True) -> None:
    status, err, count, mount = child.ask(FREEZE)
    try:
        assert (status, err, count) == (OK, 0, len(expected)), (status, err, mount, child.logs)
        if ordered:
            assert mount.split("\0") == expected
        else:
            assert sorted(mount.split("\0")) == sorted(expected)
        for m in expected:
            assert_blocked(m)
    finally:
        if status == OK:
            assert child.ask(THAW)[0] == OK
    for m in expected:
        assert_writable(m, 5)


def test_nested_filesystems_freeze_innermost_first_whatever_the_mount_order(
        workdir, make_fs, raw_child, binds):
    """top at t, mid at t/m, low at t/m/l, and top mounted again (bound) last: newest first
    would freeze top first; what is mounted inside another must go before it, so the
    order is low, mid, top."""
    top = make_fs("ext4", name="t")
    mid = make_fs("ext4", name="t/m")
    low = make_fs("ext4", name="t/m/l")
    top_again = bind(top.mountpoint, os.path.join(workdir, "tb"), binds)
    child = start(raw_child, write_config(os.path.join(workdir, "c.toml"),
                                          [top_again, mid.mountpoint, low.mountpoint],
                                          workdir, max_frozen=10))
    frozen_in_order(child, [low.mountpoint, mid.mountpoint, top_again])


def test_a_loop_backed_filesystem_freezes_before_the_one_holding_its_file(
        workdir, make_fs, raw_child, binds):
    """backed's image lives on holder, and holder is mounted again (bound) after backed:
    newest first would freeze holder first, and backed's flush would then block on it.
    The holder of the image is the filesystem of the longest mountpoint above it, not
    merely the longest or the last one: another filesystem, not frozen, is mounted last."""
    holder = make_fs("ext4", name="h", size_mb=200)
    backed = make_fs("ext4", name="b", backing_dir=holder.mountpoint)
    holder_again = bind(holder.mountpoint, os.path.join(workdir, "hb"), binds)
    make_fs("ext4", name="mounted-last-with-a-longer-name")
    child = start(raw_child, write_config(os.path.join(workdir, "c.toml"),
                                          [holder_again, backed.mountpoint], workdir,
                                          max_frozen=5))
    frozen_in_order(child, [backed.mountpoint, holder_again])


def test_filesystems_mounted_inside_each_other_are_all_frozen(
        workdir, make_fs, raw_child, binds):
    """x at x, y at x/y, and x bound again at x/y/xb: each is inside the other, so there is
    no right order; both are frozen all the same."""
    x = make_fs("ext4", name="x")
    y = make_fs("ext4", name="x/y")
    x_inside_y = bind(x.mountpoint, os.path.join(y.mountpoint, "xb"), binds)
    child = start(raw_child, write_config(os.path.join(workdir, "c.toml"),
                                          [x_inside_y, y.mountpoint], workdir,
                                          max_frozen=10))
    frozen_in_order(child, [x_inside_y, y.mountpoint], ordered=False)


# --- the child's config, read by the child itself ----------------------------------------


def test_an_unknown_key_in_state_is_refused_by_child_and_daemon(workdir, make_fs, caplog):
    fs = make_fs("ext4")
    config = write_config(os.path.join(workdir, "c.toml"), [fs.mountpoint], workdir,
                          extra="bogus = 1\n")  # lands in [state], the last section
    link = ChildLink.spawn(config, None)
    try:
        with pytest.raises(ChildGone):
            link.wait_hello()
    finally:
        link.close()
        assert link.exit_status(10) == 3  # an error, said in one line, not a violation (2)
    assert "[state]: unknown key 'bogus'" in caplog.text
    out = cli("--config", config, "-n")
    assert out.returncode == 1
    assert "[state]: unknown key 'bogus'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_zfs_veto_is_a_setting_the_child_accepts(workdir, make_fs, raw_child):
    fs = make_fs("ext4")
    child = start(raw_child, write_config(os.path.join(workdir, "c.toml"), [fs.mountpoint],
                                          workdir, extra='[check]\nzfs = "veto"\n'))
    assert child.ask(CHECK)[0] == OK


def syscalls_of_a_freeze(child: RawChild, workdir: str,
                         before: Callable[[], object] = lambda: None) -> str:
    """strace's lines for the child's syncfs and ioctl calls during one FREEZE and THAW
    (`before` runs once the tracer is attached, just before the FREEZE)."""
    out = os.path.join(workdir, "strace.out")
    pid = child.link.pid
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=syncfs,ioctl", "-o", out,
                               "-p", str(pid)], stderr=subprocess.DEVNULL)
    try:
        def traced() -> bool:
            with open(f"/proc/{pid}/status", encoding="ascii") as f:
                return any(line.split() == ["TracerPid:", str(tracer.pid)] for line in f)

        assert wait_for(traced, timeout=20)
        before()
        assert child.ask(FREEZE)[0] == OK
        assert child.ask(THAW)[0] == OK
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(20)
    with open(out, encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("case", [
    ("", 4, True), ("presync = false", 4, False), ("presync = true", 4, True),
    ("presync = true", 0, False)], ids=["default", "off", "on", "on-but-nothing-dirty"])
def test_presync_flushes_before_freezing_unless_off_or_nothing_is_dirty(
        workdir, make_fs, raw_child, case):
    """With data left dirty, each target is flushed (syncfs) before its FIFREEZE; with
    under 1 MiB dirty on the whole system (everything synced just before), the flush is
    left to the freeze itself, where it is as short."""
    presync, dirty_mib, flushed = case
    fs = make_fs("ext4", size_mb=64)
    config = write_config(os.path.join(workdir, "c.toml"), [fs.mountpoint], workdir)
    with open(config, encoding="utf-8") as f:
        text = f.read()
    assert "presync = true\n" in text
    with open(config, "w", encoding="utf-8") as f:
        f.write(text.replace("presync = true\n", presync + "\n"))
    child = start(raw_child, config)
    calls = syscalls_of_a_freeze(child, workdir, lambda: scratch.leave_dirty(
        fs.mountpoint, dirty_mib) if dirty_mib else os.sync())
    freeze = calls.index("ioctl(")  # FIFREEZE: the first ioctl
    if flushed:
        assert 0 <= calls.index("syncfs(") < freeze, calls
    else:
        assert "syncfs(" not in calls, calls


def test_not_knowing_how_much_is_dirty_the_child_flushes(monkeypatch, workdir):
    """A /proc/meminfo that cannot be opened or read leaves presync as it is configured;
    the line between flushing and not is 1 MiB, which itself is worth a flush."""
    monkeypatch.setattr(freeze_linux, "MEMINFO", os.path.join(workdir, "absent"))
    assert LinuxFreezer().worth_flushing()
    garbled = os.path.join(workdir, "meminfo")
    with open(garbled, "w", encoding="ascii") as f:
        f.write("MemTotal: 1024 kB\nDirty: some kB\nWriteback: 0 kB\n")
    monkeypatch.setattr(freeze_linux, "MEMINFO", garbled)
    assert LinuxFreezer().worth_flushing()
    with open(garbled, "w", encoding="ascii") as f:
        f.write("MemTotal: 1024 kB\nDirty: 1000 kB\nWriteback: 23 kB\n")
    assert not LinuxFreezer().worth_flushing()  # 1023 kB: just under the line
    with open(garbled, "w", encoding="ascii") as f:
        f.write("MemTotal: 1024 kB\nDirty: 1000 kB\nWriteback: 24 kB\n")
    assert LinuxFreezer().worth_flushing()  # 1024 kB: on the line


def test_a_fifreeze_that_fails_is_answered_with_its_errno_and_its_mountpoint(
        workdir, make_fs, raw_child):
    """FIFREEZE itself refused (EIO from an ext4 that was shut down): FREEZE fails naming
    the filesystem and the kernel's errno, and the child stays ready for the next request."""
    fs = make_fs("ext4")
    child = start(raw_child, write_config(os.path.join(workdir, "c.toml"), [fs.mountpoint],
                                          workdir, presync=False))
    shutdown_ext4(fs.mountpoint)
    status, err, _, mount = child.ask(FREEZE)
    assert (status, err, mount) == (FAILED, errno.EIO, fs.mountpoint)
    assert any(f"FIFREEZE: {os.strerror(errno.EIO)}" in line for line in child.logs)
    assert child.ask(CHECK)[0] == OK


def test_a_filesystem_someone_else_thawed_meanwhile_makes_no_failed_thaw(
        workdir, make_fs, raw_child):
    """Frozen by the child, thawed by someone else (fsfreeze -u) before the host's THAW: the
    THAW succeeds, since the filesystem is thawed as asked, and the log says who did it."""
    fs = make_fs("ext4")
    child = start(raw_child, write_config(os.path.join(workdir, "c.toml"), [fs.mountpoint],
                                          workdir, presync=False))
    assert child.ask(FREEZE)[0] == OK
    scratch.thaw(fs.mountpoint)  # someone else's FITHAW
    assert_writable(fs.mountpoint)
    status, err, count, _ = child.ask(THAW)
    assert (status, err, count) == (OK, 0, 1)
    assert any(f"{fs.mountpoint} was already thawed by someone else" in line
               for line in child.logs), child.logs


def test_a_check_names_each_filesystem_it_would_freeze_for_the_debug_log(
        workdir, make_fs, raw_child):
    """What selection decided for each mount is in the log at DEBUG (the parent shows it
    with `--debug`), one line each."""
    a, b = make_fs("ext4"), make_fs("xfs")
    config = write_config(os.path.join(workdir, "c.toml"), [a.mountpoint, b.mountpoint],
                          workdir)
    child = start(raw_child, config, debug=True)
    assert child.ask(CHECK)[0] == OK
    assert {f"{a.mountpoint}: freeze", f"{b.mountpoint}: freeze"} <= set(child.logs)
