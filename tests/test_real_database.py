"""Application-consistent backups of real databases, proven on the frozen image.

A database keeps committing on a scratch ext4 filesystem; an unprivileged
`hv-vss-agent hook` checkpoints it at FREEZE; while the filesystem is frozen we
copy the whole block device (O_DIRECT, around any cache), exactly what the host's
snapshot would hold.  After THAW we open the copy: the filesystem is clean, the
database opens and every transaction acknowledged before the freeze is in it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator

import pytest

from agent.dev import scratch
from tests.helpers import REPO, USER_PY, assert_blocked, running_agent, wait_for

SQLITE_WRITER = """\
import sqlite3, sys, time
db, acks = sys.argv[1:3]
con = sqlite3.connect(db, isolation_level=None, timeout=60)
con.execute("PRAGMA journal_mode=WAL")
con.execute("PRAGMA synchronous=FULL")
con.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, payload TEXT)")
ack = open(acks, "a", buffering=1)
i = 0
while True:
    i += 1
    con.execute("INSERT INTO t VALUES (?, ?)", (i, "x" * 200))  # autocommit: one transaction
    ack.write("%d\\n" % i)  # only after the commit returned
    time.sleep(0.002)
"""

SQLITE_HOOK = """#!/bin/sh
# fsfreeze-hook for a SQLite database in WAL mode
[ "$1" = freeze ] || exit 0
sqlite3 {db} ".timeout 10000" "SELECT 'mark', max(id) FROM t;" \\
    "PRAGMA wal_checkpoint(TRUNCATE);" >> {log}
"""

PG_WRITER = """\
import subprocess, sys, time
sock, acks = sys.argv[1:3]
psql = subprocess.Popen(["psql", "-h", sock, "-U", "postgres", "-X", "-q", "-A", "-t",
                         "-v", "ON_ERROR_STOP=1", "postgres"],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
ack = open(acks, "a", buffering=1)
i = 0
while True:
    i += 1
    psql.stdin.write("INSERT INTO t VALUES (%d, repeat('x', 200)) RETURNING id;\\n" % i)
    psql.stdin.flush()
    line = psql.stdout.readline()  # psql prints the id once the commit is done
    if not line:
        sys.exit(1)
    ack.write(line)
    time.sleep(0.002)
"""

PG_HOOK = """#!/bin/sh
# fsfreeze-hook for PostgreSQL: a checkpoint before the freeze shortens recovery
[ "$1" = freeze ] || exit 0
psql -h {sock} -U postgres -X -q -c CHECKPOINT && echo checkpointed >> {log}
"""


def ids(path: str) -> set[int]:
    with open(path, encoding="ascii") as f:
        return {int(line) for line in f if line.strip().isdigit()}


def shared_file(path: str, owner: int) -> str:
    with open(path, "w"):
        pass
    os.chown(path, owner, owner)
    return path


@contextlib.contextmanager
def process(argv: list[str], user: int, **kw: object) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, user=user, group=pwd.getpwuid(user).pw_gid, extra_groups=[],
                            **kw)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def hook_argv(hook: str, sock: str) -> list[str]:
    return [USER_PY, "-m", "agent", "hook", "--exec", hook, "--socket", sock, "--timeout", "20"]


def copy_device(device: str, image: str) -> None:
    subprocess.run(["dd", f"if={device}", f"of={image}", "bs=1M", "iflag=direct",
                    "status=none"], check=True, timeout=120)


def assert_clean_ext4(image: str) -> None:
    r = subprocess.run(["e2fsck", "-f", "-n", image], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0, f"the frozen image is not a clean filesystem:\n{r.stdout}{r.stderr}"


def freeze_copy_thaw(agent, fs, workdir: str, acks: str) -> tuple[set[int], str]:
    """FREEZE, the acknowledged ids, a copy of the device while frozen, THAW."""
    assert agent.sim.request("freeze", timeout=60).status == 0
    probe = assert_blocked(fs.mountpoint, 0.3)
    acked = ids(acks)  # commits return before the freeze or block until the thaw
    time.sleep(0.5)
    assert ids(acks) == acked, "the writer committed while the filesystem was frozen"
    image = os.path.join(workdir, "frozen.img")
    copy_device(fs.device, image)
    assert agent.sim.request("thaw").status == 0
    assert probe.done_within(10)
    assert wait_for(lambda: len(ids(acks)) > len(acked), 10), "the writer did not resume"
    return acked, image


def test_sqlite_wal_frozen_image_has_every_acknowledged_transaction(workdir, make_fs):
    if shutil.which("sqlite3") is None:
        pytest.fail("the sqlite3 command is missing (make test installs it)", pytrace=False)
    nobody = pwd.getpwnam("nobody").pw_uid
    fs = make_fs("ext4", size_mb=64)
    data = os.path.join(fs.mountpoint, "db")
    os.mkdir(data)
    os.chown(data, nobody, nobody)
    db = os.path.join(data, "app.sqlite")
    acks = shared_file(os.path.join(workdir, "acks"), nobody)
    hook_log = shared_file(os.path.join(workdir, "hook.log"), nobody)
    hook = os.path.join(workdir, "sqlite-hook")
    with open(hook, "w", encoding="utf-8") as f:
        f.write(SQLITE_HOOK.format(db=db, log=hook_log))
    os.chmod(hook, 0o755)

    with running_agent(workdir, [fs.mountpoint], notify={"allow_users": ["nobody"]}) as agent, \
            process([USER_PY, "-I", "-c", SQLITE_WRITER, db, acks], nobody, cwd="/"), \
            process(hook_argv(hook, agent.notify_socket), nobody, cwd=REPO):
        assert wait_for(lambda: len(ids(acks)) >= 100, 30), "the writer did not start"
        assert wait_for(lambda: "subscriber hook-sqlite-hook connected" in agent.log(), 15)
        acked, image = freeze_copy_thaw(agent, fs, workdir, acks)

    # The hook ran at FREEZE: it checkpointed everything up to its mark into the main file.
    with open(hook_log, encoding="ascii") as f:
        mark_line, checkpoint = f.read().split()
    mark = int(mark_line.split("|")[1])
    assert checkpoint.split("|")[0] == "0", f"the checkpoint was busy: {checkpoint}"
    assert 100 <= mark <= max(acked)

    assert_clean_ext4(image)
    out = os.path.join(workdir, "restored")
    os.mkdir(out)
    for name in ("app.sqlite", "app.sqlite-wal"):
        subprocess.run(["debugfs", "-R", f"dump /db/{name} {out}/{name}", image], check=True,
                       capture_output=True, timeout=60)
    main_only = os.path.join(workdir, "main-only")
    os.mkdir(main_only)
    shutil.copy(os.path.join(out, "app.sqlite"), main_only)

    con = sqlite3.connect(os.path.join(out, "app.sqlite"))
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    present = {row[0] for row in con.execute("SELECT id FROM t")}
    con.close()
    assert acked <= present, f"lost acknowledged transactions: {sorted(acked - present)[:10]}"
    # and without its WAL the main file still holds all the hook checkpointed
    con = sqlite3.connect(os.path.join(main_only, "app.sqlite"))
    checkpointed = {row[0] for row in con.execute("SELECT id FROM t")}
    con.close()
    assert set(range(1, mark + 1)) <= checkpointed


def pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        pytest.fail("PostgreSQL is not installed (make test installs the postgresql package)",
                    pytrace=False)
    return found[-1]


@contextlib.contextmanager
def postgres(datadir: str, sockdir: str, log: str, user: int) -> Iterator[None]:
    pg_ctl = pg_bin("pg_ctl")
    opts = f"-k {sockdir} -c listen_addresses='' -p 5432 -c fsync=on"
    subprocess.run([pg_ctl, "-D", datadir, "-o", opts, "-l", log, "-w", "-t", "60", "start"],
                   user=user, group=pwd.getpwuid(user).pw_gid, extra_groups=[], check=True,
                   capture_output=True, timeout=90)
    try:
        yield
    finally:
        subprocess.run([pg_ctl, "-D", datadir, "-m", "immediate", "-w", "stop"], user=user,
                       group=pwd.getpwuid(user).pw_gid, extra_groups=[], check=False,
                       capture_output=True, timeout=60)


def psql(sockdir: str, sql: str, user: int) -> str:
    return subprocess.run(["psql", "-h", sockdir, "-U", "postgres", "-X", "-q", "-A", "-t",
                           "-v", "ON_ERROR_STOP=1", "-c", sql, "postgres"], user=user,
                          group=pwd.getpwuid(user).pw_gid, extra_groups=[], check=True,
                          capture_output=True, text=True, timeout=60).stdout


def test_postgresql_frozen_image_recovers_every_acknowledged_transaction(workdir, make_fs):
    initdb = pg_bin("initdb")
    try:
        pg = pwd.getpwnam("postgres").pw_uid
    except KeyError:
        pytest.fail("no postgres account (the postgresql package makes it)", pytrace=False)
    fs = make_fs("ext4", size_mb=256)
    datadir = os.path.join(fs.mountpoint, "pgdata")
    os.mkdir(datadir, 0o700)
    os.chown(datadir, pg, pg)
    sockdir = os.path.join(workdir, "pgsock")  # not on the frozen filesystem
    os.mkdir(sockdir, 0o755)
    os.chown(sockdir, pg, pg)
    pglog = shared_file(os.path.join(workdir, "pg.log"), pg)
    acks = shared_file(os.path.join(workdir, "acks"), pg)
    hook_log = shared_file(os.path.join(workdir, "hook.log"), pg)
    hook = os.path.join(workdir, "pg-hook")
    with open(hook, "w", encoding="utf-8") as f:
        f.write(PG_HOOK.format(sock=sockdir, log=hook_log))
    os.chmod(hook, 0o755)
    subprocess.run([initdb, "-D", datadir, "-U", "postgres", "-A", "trust", "--no-sync"],
                   user=pg, group=pwd.getpwuid(pg).pw_gid, extra_groups=[], check=True,
                   capture_output=True, timeout=120, cwd="/")

    with postgres(datadir, sockdir, pglog, pg):
        psql(sockdir, "CREATE TABLE t (id int PRIMARY KEY, payload text); CHECKPOINT;", pg)
        with running_agent(workdir, [fs.mountpoint],
                           notify={"allow_users": ["postgres"]}) as agent, \
                process([USER_PY, "-I", "-c", PG_WRITER, sockdir, acks], pg, cwd="/"), \
                process(hook_argv(hook, agent.notify_socket), pg, cwd=REPO):
            assert wait_for(lambda: len(ids(acks)) >= 100, 30), "the writer did not start"
            assert wait_for(lambda: "subscriber hook-pg-hook connected" in agent.log(), 15)
            acked, image = freeze_copy_thaw(agent, fs, workdir, acks)
    with open(hook_log, encoding="ascii") as f:
        assert f.read().split() == ["checkpointed"]

    # The copy, as a restored VM would boot it: its own loop device, its own server.
    assert_clean_ext4(image)
    restored = scratch.ScratchFS("ext4", image, "", os.path.join(workdir, "restored"))
    try:
        restored.device = subprocess.run(["losetup", "--find", "--show", image], check=True,
                                         capture_output=True, text=True).stdout.strip()
        os.mkdir(restored.mountpoint)
        subprocess.run(["mount", "-t", "ext4", restored.device, restored.mountpoint],
                       check=True, capture_output=True)
        copy = os.path.join(restored.mountpoint, "pgdata")
        os.unlink(os.path.join(copy, "postmaster.pid"))  # as backup tools leave it out
        sock2 = os.path.join(workdir, "pgsock2")
        os.mkdir(sock2, 0o755)
        os.chown(sock2, pg, pg)
        log2 = shared_file(os.path.join(workdir, "pg2.log"), pg)
        with postgres(copy, sock2, log2, pg):
            present = {int(x) for x in psql(sock2, "SELECT id FROM t", pg).split()}
        with open(log2, encoding="utf-8", errors="replace") as f:
            assert "database system is ready to accept connections" in f.read()
    finally:
        if restored.device:
            scratch.destroy(restored)
    assert acked <= present, f"lost acknowledged transactions: {sorted(acked - present)[:10]}"
