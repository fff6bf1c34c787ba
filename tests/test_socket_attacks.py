"""The subscriber and control sockets under attack by other local users, for real.

The real agent against the simulator, attackers as separate processes under uids of
their own (most have no account: the kernel does not need one), so what the kernel
and the frontend see is what an attacker would show them.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest

from agent.engine import listeners
from agent.engine.listeners import Access, listen_unix
from agent.errors import StartupError
from agent.frontend.main import MAX_PER_UID
from tests.helpers import REPO, USER_PY, Agent, running_agent, wait_for
from tests.test_status_metrics import status_json

NOBODY = 65534
DAEMON = 1
STRANGERS = range(40001, 40009)  # eight users not on any allowlist
HOOK_RUNS = 5

# Connects as fast as it can until SIGTERM; holds up to `hold` connections the agent
# keeps open (reconnecting when it drops one), and closes every other one at once.
# Prints how many connect() calls it made and how many the kernel let through.
FLOOD = """\
import select, signal, socket, sys
path, hold = sys.argv[1], int(sys.argv[2])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
held, poller, tries, ok = {}, select.poll(), 0, 0
while not stop:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    tries += 1
    try:
        s.connect(path)
        ok += 1
    except OSError:
        s.close()
        s = None
    if s is not None and len(held) < hold:
        held[s.fileno()] = s
        poller.register(s.fileno(), select.POLLIN)
    elif s is not None:
        s.close()
    for fd, _ in poller.poll(0):
        try:
            data = held[fd].recv(4096)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if not data:
            poller.unregister(fd)
            held.pop(fd).close()
print(tries, ok)
"""


@contextlib.contextmanager
def flooding(path: str, uids: list[int], hold: int = 0) -> Iterator[list[tuple[int, int]]]:
    """Flooders under `uids`; once done, the list holds each one's (tries, connected)."""
    procs = [subprocess.Popen([USER_PY, "-I", "-c", FLOOD, path, str(hold)],
                              user=uid, group=uid, extra_groups=[], cwd="/",
                              stdout=subprocess.PIPE, text=True)
             for uid in uids]
    counts: list[tuple[int, int]] = []
    try:
        time.sleep(1.0)  # let them get going
        yield counts
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            out, _ = p.communicate(timeout=30)
            tries, ok = out.split()
            counts.append((int(tries), int(ok)))


def hook_subscribes(workdir: str, path: str, user: int = NOBODY) -> str:
    """Run `hv-vss-agent hook` as `user`: '' once it has subscribed, else its error."""
    hook = os.path.join(workdir, "noop-hook")
    if not os.path.exists(hook):
        with open(hook, "w", encoding="utf-8") as f:
            f.write("#!/bin/sh\nexit 0\n")
        os.chmod(hook, 0o755)
    err_path = os.path.join(workdir, f"hook-{user}.err")
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([USER_PY, "-m", "agent", "hook", "--exec", hook, "--socket",
                                 path], cwd=REPO, user=user, group=user, extra_groups=[],
                                stderr=err)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(err_path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            if "subscribed to" in text:
                return ""
            if proc.poll() is not None:
                return text.strip() or f"exit status {proc.returncode}"
            time.sleep(0.05)
        return "neither subscribed nor failed within 60 s"
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(10)


def test_a_flood_by_users_not_on_the_allowlist_cannot_stop_a_hook(workdir, make_fs):
    fs = make_fs("ext4")
    with running_agent(workdir, [fs.mountpoint], notify={"allow_users": ["nobody"]}) as agent:
        with flooding(agent.notify_socket, list(STRANGERS)) as counts:
            failures = [why for why in (hook_subscribes(workdir, agent.notify_socket)
                                        for _ in range(HOOK_RUNS)) if why]
        assert not failures, failures
    # The kernel refused every one of their attempts: none ever reached the queue.
    assert all(tries > 1000 for tries, _ in counts), counts
    assert all(ok == 0 for _, ok in counts), counts


def test_an_allowlisted_flood_beyond_its_limit_does_not_starve_another_user(workdir, make_fs):
    fs = make_fs("ext4")
    notify = {"allow_users": ["nobody", "daemon"]}
    with running_agent(workdir, [fs.mountpoint], notify=notify) as agent:
        with flooding(agent.notify_socket, [DAEMON] * 4, hold=100) as counts:
            failures = [why for why in (hook_subscribes(workdir, agent.notify_socket)
                                        for _ in range(HOOK_RUNS)) if why]
            held = [s["uid"] for s in status_json(agent)["frontend"]["subscribers"]]
        assert not failures, failures
        assert held.count(DAEMON) == MAX_PER_UID, held
        assert f"too many connections from uid {DAEMON} ({MAX_PER_UID})" in agent.log()
    assert sum(ok for _, ok in counts) > 10 * MAX_PER_UID, counts


# --- who the kernel lets in, and who the frontend lets in after it --------------------

# Connects, prints what the agent says first (or the errno of a refused connect()),
# for subscriber and control sockets alike.
KNOCK = """\
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("errno", e.errno)
    sys.exit(0)
data = b""
try:
    if sys.argv[2:]:
        s.sendall(sys.argv[2].encode() + b"\\n")
    while chunk := s.recv(65536):
        data += chunk
        if not sys.argv[2:]:
            break
except (BrokenPipeError, ConnectionResetError):  # closed before reading us
    pass
print("said", data.decode(errors="replace").splitlines()[0] if data else "nothing")
"""
EACCES = "errno 13"


def knock(path: str, uid: int, groups: tuple[int, ...] = (), dac_override: bool = False,
          send: str | None = None) -> str:
    """As `uid` (with `groups`), optionally holding CAP_DAC_OVERRIDE and nothing else, as a
    service granted it would: file permissions no longer stop it, its uid is still its own."""
    argv = [USER_PY, "-I", "-c", KNOCK, path, *([send] if send else [])]
    if dac_override:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}",
                f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups",
                "--inh-caps=+dac_override", "--ambient-caps=+dac_override", *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True,
                              cwd="/").stdout.strip()
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True, cwd="/",
                          user=uid, group=uid, extra_groups=list(groups)).stdout.strip()


def acl_entries(path: str) -> list[tuple[int, int, int]]:
    raw = os.getxattr(path, listeners.ACL_XATTR, follow_symlinks=False)
    assert struct.unpack_from("<I", raw)[0] == listeners.ACL_XATTR_VERSION
    return [struct.unpack_from("<HHI", raw, off) for off in range(4, len(raw), 8)]


def test_the_kernel_lets_only_the_allowlist_reach_the_notify_socket(workdir, make_fs):
    fs = make_fs("ext4")
    adm = grp.getgrnam("adm").gr_gid
    notify = {"allow_users": ["nobody"], "allow_groups": ["adm"]}
    with running_agent(workdir, [fs.mountpoint], notify=notify) as agent:
        path = agent.notify_socket
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and (st.st_uid, st.st_gid) == (0, 0)
        assert stat.S_IMODE(st.st_mode) == 0o660  # the group bits show the ACL's mask
        u = listeners.ACL_UNDEFINED_ID
        assert acl_entries(path) == [(listeners.ACL_USER_OBJ, 6, u),
                                     (listeners.ACL_USER, 6, NOBODY),
                                     (listeners.ACL_GROUP_OBJ, 0, u),
                                     (listeners.ACL_GROUP, 6, adm),
                                     (listeners.ACL_MASK, 6, u), (listeners.ACL_OTHER, 0, u)]
        assert knock(path, NOBODY) == "said HVVSS 1"
        assert knock(path, DAEMON, (adm,)) == "said HVVSS 1"
        assert knock(path, 0) == "said HVVSS 1"
        assert knock(path, DAEMON) == EACCES
        assert knock(path, STRANGERS[0]) == EACCES
        hvvss = pwd.getpwnam("hvvss").pw_uid  # the agent's own account is a stranger too
        assert knock(path, hvvss) == EACCES


def test_the_frontend_refuses_a_stranger_the_kernel_let_through(workdir, make_fs):
    """A peer the file's permissions do not stop (CAP_DAC_OVERRIDE) is still checked."""
    fs = make_fs("ext4")
    with running_agent(workdir, [fs.mountpoint], notify={"allow_users": ["nobody"]}) as agent:
        assert knock(agent.notify_socket, STRANGERS[1], dac_override=True) == \
            "said REFUSED not in [notify] allow_users or allow_groups"
        assert knock(agent.notify_socket, NOBODY, dac_override=True) == "said HVVSS 1"
        assert f"refused subscriber uid {STRANGERS[1]}" in agent.log()


def test_control_peer_check_with_real_admin_and_non_admin_uids(workdir, make_fs):
    fs = make_fs("ext4")
    adm = grp.getgrnam("adm").gr_gid
    with running_agent(workdir, [fs.mountpoint], control={"admin_group": "adm"}) as agent:
        path = agent.control_socket
        st = os.lstat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, adm)
        assert knock(path, DAEMON, (adm,), send="STATUS 1").startswith('said {"version"')
        assert knock(path, DAEMON, (adm,), dac_override=True,
                     send="STATUS 1").startswith('said {"version"')
        # Not in admin_group: the kernel stops it at connect(); let through, the frontend
        # reads its credentials, closes, and answers nothing.
        assert knock(path, DAEMON, send="STATUS 1") == EACCES
        assert knock(path, DAEMON, dac_override=True, send="STATUS 1") == "said nothing"
        assert knock(path, STRANGERS[2], dac_override=True, send="STATUS 1") == "said nothing"
        assert wait_for(lambda: f"refused control client uid {STRANGERS[2]}" in agent.log())


def test_a_filesystem_without_posix_acls_is_refused_in_one_line(workdir, make_fs):
    fs = make_fs("ext4")
    plain = make_fs("btrfs", options="noacl")
    notify = {"socket": os.path.join(plain.mountpoint, "notify.sock"),
              "allow_users": ["nobody"]}
    agent = Agent(workdir, [fs.mountpoint], notify=notify)
    try:
        agent.start(wait=False)
        assert agent.wait_exit(60) == 1
    finally:
        agent.stop()
    last = agent.log().strip().splitlines()[-1]
    assert last.startswith(f"hv-vss-agent: [notify] socket {notify['socket']}: its filesystem "
                           "does not support POSIX ACLs"), last
    assert not os.path.exists(notify["socket"])
    assert [n for n in os.listdir(plain.mountpoint) if n.startswith(".hv-vss-agent")] == []
    # One group and no users needs no ACL: the file's group does it, on any filesystem.
    notify["allow_users"], notify["allow_groups"] = [], ["adm"]
    with running_agent(workdir, [fs.mountpoint], notify=notify) as agent:
        st = os.lstat(notify["socket"])
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, grp.getgrnam("adm").gr_gid)
        assert knock(notify["socket"], DAEMON, (st.st_gid,)) == "said HVVSS 1"
        assert knock(notify["socket"], NOBODY) == EACCES


ATTACKER = 40100
STARTS = 10

# Whenever one of the agent's sockets appears, put a symlink to `target` in its place.
SWAP = """\
import os, stat, sys, time
directory, target, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
paths = [os.path.join(directory, n) for n in ("notify.sock", "control.sock")]
end, swaps, n = time.monotonic() + seconds, 0, 0
while True:
    n += 1
    if n % 4096 == 0 and time.monotonic() > end:
        break
    for p in paths:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if stat.S_ISSOCK(st.st_mode):
            try:
                os.symlink(target, p + ".new")
            except FileExistsError:
                pass
            os.rename(p + ".new", p)
            swaps += 1
"""


def test_the_agent_refuses_socket_directories_a_user_owns_while_it_races_them(workdir,
                                                                            make_fs):
    fs = make_fs("ext4")
    with attacker_directory(workdir) as (theirs, secret):
        before = os.stat(secret)
        sockets = {"notify": {"socket": os.path.join(theirs, "notify.sock"),
                              "allow_users": ["nobody"]},
                   "control": {"socket": os.path.join(theirs, "control.sock"),
                               "admin_group": "adm"}}
        for i in range(STARTS):
            for name in ("notify.sock", "control.sock"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(theirs, name))
            agent = Agent(workdir, [fs.mountpoint], **sockets)
            try:
                agent.start(wait=False)
                assert agent.proc is not None
                try:
                    code = agent.wait_exit(30)
                except subprocess.TimeoutExpired:
                    code = None
            finally:
                agent.stop()
            assert not unchanged(secret, before), f"start {i}: {unchanged(secret, before)}"
            assert code == 1, f"start {i}: the agent did not refuse ({code}):\n{agent.log()}"
    last = agent.log().strip().splitlines()[-1]
    assert last == f"hv-vss-agent: [notify] socket {theirs}/notify.sock: refusing a " \
        f"directory others could change: {theirs} is owned by uid {ATTACKER}, not root", last


@contextlib.contextmanager
def attacker_directory(workdir: str) -> Iterator[tuple[str, str]]:
    """A directory the attacker owns, a root-only file to aim at, and the attacker
    swapping any socket that appears in that directory for a link to the file."""
    theirs = os.path.join(workdir, "theirs")
    os.mkdir(theirs, 0o755)
    os.chown(theirs, ATTACKER, ATTACKER)
    secret = os.path.join(workdir, "shadow")  # like /etc/shadow: root:shadow 0640
    with open(secret, "w", encoding="utf-8") as f:
        f.write("root:*:20000:0:99999:7:::\n")
    os.chown(secret, 0, grp.getgrnam("shadow").gr_gid)
    os.chmod(secret, 0o640)
    swapper = subprocess.Popen([USER_PY, "-I", "-c", SWAP, theirs, secret, "600"],
                               user=ATTACKER, group=ATTACKER, extra_groups=[], cwd="/")
    try:
        time.sleep(0.3)
        yield theirs, secret
    finally:
        swapper.kill()
        swapper.wait()


def unchanged(path: str, before: os.stat_result) -> str:
    st = os.stat(path)
    if (st.st_mode, st.st_uid, st.st_gid) == (before.st_mode, before.st_uid, before.st_gid):
        return ""
    return f"{path} is now {stat.filemode(st.st_mode)} {st.st_uid}:{st.st_gid}"


RACES = 2000


@pytest.mark.parametrize("access", [Access(), Access(group=4),
                                    Access(users=frozenset({NOBODY}))],
                         ids=["root-only", "group", "acl"])
def test_listen_unix_refuses_a_directory_a_user_owns_however_it_is_raced(workdir, access):
    with attacker_directory(workdir) as (theirs, secret):
        before = os.stat(secret)
        path = os.path.join(theirs, "notify.sock")
        for i in range(RACES):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            with pytest.raises(StartupError, match=f"owned by uid {ATTACKER}"):
                listen_unix(path, access, "[notify] socket")
            assert not unchanged(secret, before), f"race {i}: {unchanged(secret, before)}"


@pytest.mark.parametrize("access", [Access(), Access(group=4),
                                    Access(users=frozenset({NOBODY}))],
                         ids=["root-only", "group", "acl"])
def test_listen_unix_never_changes_what_the_path_names_even_untrusted(workdir, access,
                                                                    monkeypatch):
    """The second line of defence: with the directory check switched off, the attacker's
    swaps still reach nothing, because nothing is done by a path it can redirect."""
    monkeypatch.setattr(listeners, "untrusted_reason", lambda path: None)
    with attacker_directory(workdir) as (theirs, secret):
        before = os.stat(secret)
        path = os.path.join(theirs, "notify.sock")
        made = 0
        for i in range(RACES):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            with contextlib.suppress(StartupError):
                listen_unix(path, access, "[notify] socket").close()
                made += 1
            assert not unchanged(secret, before), f"race {i}: {unchanged(secret, before)}"
        assert made > RACES // 2
