"""Where the sockets live by default, and that unprivileged clients can reach them there.

The state directory is root's alone (0700): a socket inside it cannot be reached by
anyone else, whatever the socket's own permissions say.
"""

from __future__ import annotations

import grp
import os

from agent.clients.cli import DEFAULT_CONTROL_SOCKET, DEFAULT_NOTIFY_SOCKET
from privileged.config import ChildConfig
from tests.helpers import REPO, cli, running_agent, wait_for
from tests.test_socket_attacks import DAEMON, EACCES, NOBODY, hook_subscribes, knock
from tests.unit_file import directives

SOCKETS = os.path.dirname(DEFAULT_NOTIFY_SOCKET)


def tmpfiles() -> dict[str, tuple[str, ...]]:
    with open(os.path.join(REPO, "etc", "tmpfiles.d", "hv-vss-agent.conf"),
              encoding="utf-8") as f:
        rows = [line.split() for line in f if line.strip() and not line.startswith("#")]
    return {row[1]: tuple(row[2:5]) for row in rows if row[0] == "d"}


def test_the_shipped_socket_directory_is_open_to_pass_and_is_not_the_state_directory():
    assert os.path.dirname(DEFAULT_CONTROL_SOCKET) == SOCKETS
    state = ChildConfig().state.dir
    assert os.path.commonpath([SOCKETS, state]) != state
    assert tmpfiles()[SOCKETS] == ("0755", "root", "root")
    unit = directives()
    assert f"-{SOCKETS}" in unit["ReadWritePaths"]  # writable for root under ProtectSystem
    assert ("/run/" + unit["RuntimeDirectory"][0], unit["RuntimeDirectoryMode"]) == \
        (state, ["0700"])


def test_clients_reach_sockets_laid_out_as_shipped(workdir, make_fs):
    fs = make_fs("ext4")
    os.mkdir(os.path.join(workdir, "state"), 0o700)  # as RuntimeDirectoryMode makes it
    sockets = os.path.join(workdir, os.path.basename(SOCKETS))
    os.mkdir(sockets)
    os.chmod(sockets, 0o755)  # as tmpfiles.d makes it
    adm = grp.getgrnam("adm").gr_gid
    with running_agent(workdir, [fs.mountpoint],
                       notify={"socket": os.path.join(sockets, "notify.sock"),
                               "allow_users": ["nobody"]},
                       control={"socket": os.path.join(sockets, "control.sock"),
                                "admin_group": "adm"}) as agent:
        assert hook_subscribes(workdir, os.path.join(sockets, "notify.sock"), NOBODY) == ""
        r = cli("status", "--socket", os.path.join(sockets, "control.sock"), user="daemon",
                group="daemon", extra_groups=["adm"])
        assert r.returncode == 0 and "thawed" in r.stdout, r.stderr
        assert knock(os.path.join(sockets, "control.sock"), DAEMON, (adm,),
                     send="STATUS 1").startswith("said {")
        assert "does not let others pass" not in agent.log()


def test_sockets_in_the_state_directory_are_out_of_reach_and_the_log_says_so(workdir,
                                                                            make_fs):
    fs = make_fs("ext4")
    state = os.path.join(workdir, "state")
    os.mkdir(state, 0o700)
    with running_agent(workdir, [fs.mountpoint],
                       notify={"socket": os.path.join(state, "notify.sock"),
                               "allow_users": ["nobody"]}) as agent:
        assert knock(os.path.join(state, "notify.sock"), NOBODY) == EACCES
        assert wait_for(lambda: f"directory {state} (mode 0700) does not let others pass"
                        in agent.log())
