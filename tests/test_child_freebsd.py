"""The real root child process running the FreeBSD freezer, with the ffs_suspend.c model
as its kernel (tests/ufs_model.py child_main).

The model counts the child's real threads (/proc/self/task) and looks at its
real descriptors (/proc/self/fd) at the moment of every UFSSUSPEND, exactly
where FreeBSD's kernel would, and refuses with EDEADLK as the kernel would.
So these tests prove, of the real child: one thread when it suspends, and no
file open for writing on the filesystem it suspends, even when the parent
gave it a stderr that is such a file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from agent.engine.child_link import ChildLink
from privileged import child, wire
from privileged.budget import Bucket
from privileged.child_config import parse_child_sections
from privileged.freeze_freebsd import FreeBSDFreezer
from privileged.statefile import StateDir
from privileged.wire import Op
from tests.helpers import REPO, write_config
from tests.ufs_model import ModelMount, UfsModel

pytestmark = pytest.mark.freebsd_model

BOOT = (f"import sys; sys.path.insert(0, {REPO!r}); "
        "from tests.ufs_model import child_main; sys.exit(child_main(sys.argv[1:]))")


def spawn(workdir: str, *, release_stdio: bool = True) -> tuple[ChildLink, str]:
    data = os.path.join(workdir, "data")  # stands for the contents of /ufs/data
    os.makedirs(data, exist_ok=True)
    events = os.path.join(workdir, "events.jsonl")
    spec = {
        "mounts": [
            {"mountpoint": "/", "fsid": "01000000" "35000000", "source": "/dev/ada0p2"},
            {"mountpoint": "/ufs/data", "fsid": "02000000" "35000000", "realdir": data},
            {"mountpoint": "/ufs/home", "fsid": "03000000" "35000000"},
            {"mountpoint": "/tmp", "fsid": "04000000" "90000000", "fstype": "tmpfs"},
        ],
        "events": events,
        "release_stdio": release_stdio,
    }
    spec_path = os.path.join(workdir, "model.json")
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    cfg = write_config(os.path.join(workdir, "child.toml"), ["/ufs/data", "/ufs/home"], workdir)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.set_inheritable(False)
    fd = theirs.fileno()
    # The parent's stderr is a log file on the filesystem the child will suspend.
    with open(os.path.join(data, "agent.log"), "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-S", "-c", BOOT, "--model", spec_path,
             "--fd", str(fd), "--ppid", str(os.getpid()), "--config", cfg],
            pass_fds=(fd,), env={}, cwd="/", close_fds=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=err)
    theirs.close()
    link = ChildLink(ours, proc)
    link.wait_hello()
    return link, events


def events_of(path: str) -> list[dict[str, object]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_one_thread_at_every_suspension_and_stderr_released(workdir):
    link, events = spawn(workdir, release_stdio=True)
    assert link.hello is not None and link.hello.targets == 2
    try:
        check, _ = link.request(Op.CHECK)
        assert (check.status, check.count) == (wire.Status.OK, 2)
        freeze, _ = link.request(Op.FREEZE)
        assert (freeze.status, freeze.count) == (wire.Status.OK, 2), freeze
        suspends = [e for e in events_of(events) if e["call"] == "suspend"]
        assert [(e["mount"], e["errno"], e["threads"]) for e in suspends] == [
            ("/ufs/home", 0, 1), ("/ufs/data", 0, 1)]
        assert not os.path.exists(os.path.join(workdir, "state"))  # no crash record on FreeBSD
        thaw, _ = link.request(Op.THAW)
        assert (thaw.status, thaw.count) == (wire.Status.OK, 2)
        closes = [e["mount"] for e in events_of(events) if e["call"] == "close"]
        assert closes == ["/ufs/data", "/ufs/home"]  # thawed in reverse
        link.request(Op.QUIT)
        assert link.exit_status(10) == 0
    finally:
        link.close()
        link.exit_status(10)


def test_without_releasing_stderr_the_kernel_refuses_and_all_is_rolled_back(workdir):
    """The control: the same child, its stderr left a file on /ufs/data, gets EDEADLK."""
    link, events = spawn(workdir, release_stdio=False)
    try:
        freeze, _ = link.request(Op.FREEZE)
        assert (freeze.status, freeze.errno, freeze.mount) == (
            wire.Status.FAILED, errno.EDEADLK, "/ufs/data")
    finally:
        link.close()
        link.exit_status(10)
    assert [(e["call"], e["mount"], e["errno"]) for e in events_of(events)] == [
        ("sync", "-", 0),
        ("suspend", "/ufs/home", 0),
        ("suspend", "/ufs/data", errno.EDEADLK),
        ("close", "/ufs/home", 0),  # the rollback resumes /ufs/home
        ("close", "-", 0),  # then lets go of the refused descriptor
    ]




# --- the child's CHECK handler in-process, on the model: nothing here is a process ----------


class Sent:
    """Stands in for the child's socket: keeps what it would have sent."""

    def __init__(self) -> None:
        self.results: list[wire.ChildMessage] = []

    def sendmsg(self, buffers: list[bytes], anc: object = (), flags: int = 0) -> int:
        self.results.append(wire.decode_child(buffers[0]))
        return len(buffers[0])


@pytest.fixture
def child_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """What the child logs (in a process it would be LOG records to the parent)."""
    lines: list[tuple[int, str]] = []
    monkeypatch.setattr(child, "log", lambda level, text: lines.append((level, text)))
    return lines


def check_on(mounts: list[ModelMount], **sections: dict[str, object]) -> wire.ChildMessage:
    freezer = FreeBSDFreezer(UfsModel(mounts, threads=lambda: 1))
    sent = Sent()
    one = child.Child(sent, freezer, parse_child_sections(sections),  # type: ignore[arg-type]
                      StateDir("/nonexistent", enabled=False), Bucket(60, 0, 60, 0))
    one.handle_check(Op.CHECK, 1)
    (res,) = sent.results
    return res


TYPICAL = [
    ModelMount("/", bytes([1]) + bytes(7)),
    ModelMount("/tmp", bytes([2]) + bytes(7), "tmpfs"),
    ModelMount("/zroot", bytes([3]) + bytes(7), "zfs"),
    ModelMount("/zroot/usr/home", bytes([4]) + bytes(7), "zfs"),
    ModelMount("/zroot/var/log", bytes([5]) + bytes(7), "zfs"),
]


def test_zfs_datasets_get_one_log_line_per_check(child_log):
    res = check_on(TYPICAL)
    assert (res.status, res.count) == (wire.Status.OK, 1)
    lines = [text for _, text in child_log if "ZFS" in text]
    assert lines == ["ZFS datasets get crash consistency only (copy-on-write keeps them "
                     "intact): /zroot, /zroot/usr/home, /zroot/var/log"]


def test_strict_check_vetoes_and_the_log_says_which_and_why(child_log):
    res = check_on(TYPICAL, check={"mode": "strict"})
    assert (res.status, res.errno, res.mount) == (wire.Status.REFUSED, errno.EPERM, "/tmp")
    assert [text for level, text in child_log if level == logging.WARNING] == [
        'CHECK vetoed by /tmp: read-write tmpfs filesystem ([check] mode = "strict": only ufs '
        "may be mounted read-write, as in the stock daemon)"]
    res = check_on(TYPICAL, check={"zfs": "veto"})
    assert (res.status, res.mount) == (wire.Status.REFUSED, "/zroot")


def test_a_line_that_repeats_the_last_check_s_is_debug_and_news_is_info(child_log):
    """The parent writes every line the child sends, between one host request and the
    next: a CHECK that says what the last one said says it at debug level."""
    model = UfsModel(list(TYPICAL), threads=lambda: 1)
    one = child.Child(Sent(), FreeBSDFreezer(model), parse_child_sections({}),  # type: ignore[arg-type]
                      StateDir("/nonexistent", enabled=False), Bucket(60, 0, 60, 0))
    one.handle_check(Op.CHECK, 1)
    one.handle_check(Op.CHECK, 2)
    model.mounts = [m for m in model.mounts if m.mountpoint != "/zroot/var/log"]
    one.handle_check(Op.CHECK, 3)
    zfs = [level for level, text in child_log if text.startswith("ZFS")]
    verdicts = [level for level, text in child_log if text.startswith("CHECK: ")]
    assert zfs == [logging.INFO, logging.DEBUG, logging.INFO]  # one dataset fewer: news
    assert verdicts == [logging.INFO, logging.DEBUG, logging.DEBUG]


QUIET = ("import json, os, sys; from privileged import hardening; hardening.LINUX = False; "
         "fds = lambda: sorted(map(int, os.listdir('/proc/self/fd'))); before = fds(); "
         "hardening.quiet_stdio(); after = fds(); "
         "links = [os.readlink(f'/proc/self/fd/{n}') for n in (0, 1, 2)]; "
         "open(sys.argv[1], 'w').write(json.dumps([before, after, links]))")


QUIET_SOURCE = os.path.join(REPO, "privileged", "hardening.py")


def test_the_freebsd_child_s_stdio_becomes_dev_null_and_nothing_more_stays_open(workdir):
    """FreeBSD's branch of quiet_stdio: 0-2 are pointed at /dev/null rather than closed (a
    /dev/ufssuspend opened later must not become descriptor 2, where a stray write would
    reach the disk), and the descriptor /dev/null was opened on is closed again."""
    out, log = os.path.join(workdir, "fds.json"), os.path.join(workdir, "stderr.log")
    with open(log, "wb") as err, open(QUIET_SOURCE, "rb") as given:  # 0-2: no /dev/null yet
        subprocess.run([sys.executable, "-c", QUIET, out], cwd=REPO, check=True,
                       stdin=given, stdout=err, stderr=err, timeout=30)
    with open(out, encoding="utf-8") as f:
        before, after, links = json.load(f)
    assert links == ["/dev/null"] * 3
    assert after == before
