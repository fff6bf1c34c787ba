"""What an operator meets first: --version, a device that is not there, whose log line is
whose, and an example config that really lists every key with its default."""

from __future__ import annotations

import importlib.metadata
import os
import re
import signal
import subprocess
import tomllib

import pytest

from agent import config
from agent.clients.cli import DEFAULT_CONTROL_SOCKET, DEFAULT_NOTIFY_SOCKET
from agent.engine.root import missing_device_hint
from privileged import child_config
from tests.helpers import PY, REPO, Agent, running_agent, wait_for

EXAMPLE = os.path.join(REPO, "etc", "hv-vss-agent.toml")


def test_version_is_the_installed_packages():
    r = subprocess.run([PY, "-m", "agent", "--version"], cwd=REPO, capture_output=True,
                       text=True, timeout=30, check=False)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == f"hv-vss-agent {importlib.metadata.version('hv-vss-agent')}\n"


def test_a_missing_device_is_explained_after_a_few_seconds_and_still_waited_for(workdir):
    """A device node under /dev (not a Hyper-V guest?) and a simulator's socket that is
    not served yet: one line each at once, one hint later, and the agent keeps waiting."""
    hyperv = Agent(workdir, ["/nonexistent"], frontend=False,  # the last --device wins
                   extra_args=("--device", "/dev/hv-vss-agent-test-no-such-device"),
                   log_path=os.path.join(workdir, "hyperv.log"))
    sim = Agent(workdir, ["/nonexistent"], frontend=False,  # its simulator never starts
                log_path=os.path.join(workdir, "sim.log"))
    try:
        hyperv.launch(wait=False)
        sim.launch(wait=False)
        for agent in (hyperv, sim):
            assert wait_for(lambda a=agent: "still does not exist" in a.log(), 20), agent.log()
            assert agent.proc.poll() is None, "it stopped waiting"
            lines = agent.log().splitlines()
            assert sum("waiting for" in line for line in lines) == 1
            assert sum("still does not exist" in line for line in lines) == 1
            assert "Traceback" not in agent.log()
        hint = hyperv.log().strip().splitlines()[-1]
        assert "WARNING: /dev/hv-vss-agent-test-no-such-device still does not exist after 5 s: " \
               "this is probably not a Hyper-V guest, or the hv_utils module is not loaded " \
               "(modprobe hv_utils)" in hint, hint
        assert "start the simulator" in sim.log().strip().splitlines()[-1]
    finally:
        for agent in (hyperv, sim):
            if agent.proc is not None and agent.proc.poll() is None:
                agent.proc.send_signal(signal.SIGTERM)
                agent.proc.wait(10)


def test_missing_device_hints_name_each_systems_driver():
    assert "hv_utils module" in missing_device_hint("/dev/vmbus/hv_vss", "linux", 5)
    assert "hv_vss driver" in missing_device_hint("/dev/hv_fsvss_dev", "freebsd", 5)
    assert "simulator" in missing_device_hint("/tmp/x/vss.sock", "linux", 5)


def test_the_childs_log_lines_carry_the_childs_pid(workdir, make_fs):
    fs = make_fs("ext4")
    with running_agent(workdir, [fs.mountpoint]) as agent:
        for op in ("check", "freeze", "thaw"):
            assert agent.sim.request(op).status == 0
        assert wait_for(lambda: "THAWED" in agent.log())
        parent, child = agent.parent.pid, agent.child.pid
        log = agent.log()
    mine = re.findall(r" hv-vss-agent\.child\[(\d+)\] [A-Z]+: \[child\] ", log)
    others = re.findall(r" hv-vss-agent\[(\d+)\] [A-Z]+: ", log)
    assert len(mine) >= 4 and set(mine) == {str(child)}, log  # CHECK, FROZEN, THAWED, ...
    assert others and set(others) == {str(parent)}, log


def _keys_the_parser_reads(monkeypatch: pytest.MonkeyPatch) -> set[tuple[str, str]]:
    seen: set[tuple[str, str]] = set()
    done = child_config.Table.done

    def record(self: child_config.Table) -> None:
        seen.update((self.name, key) for key in self.seen)
        done(self)

    monkeypatch.setattr(child_config.Table, "done", record)
    config.parse({}, None)
    return seen


def test_the_example_config_lists_every_key_with_its_default(monkeypatch):
    keys = _keys_the_parser_reads(monkeypatch)
    assert ("watchdog", "max_frozen_seconds") in keys and ("metrics", "dir") in keys
    listed, section = set(), None
    with open(EXAMPLE, encoding="utf-8") as f:
        for line in f:
            if m := re.match(r"\[(\w+)\]", line):
                section = m.group(1)
            elif m := re.match(r"#?\s*(\w+)\s*=", line):
                listed.add((section, m.group(1)))
    assert sorted(keys - listed) == [], "keys missing from etc/hv-vss-agent.toml"
    assert sorted(listed - keys) == [], "keys the agent does not know"
    with open(EXAMPLE, "rb") as f:
        doc = tomllib.load(f)
    # The values it sets are the defaults: installing it as is changes nothing.
    assert config.parse(doc, None) == config.parse({}, None)


def test_the_example_config_is_accepted_by_the_agent(workdir):
    """Installed as documented (root's, 0600), with its commented sockets and directory set."""
    path = os.path.join(workdir, "example.toml")
    with open(EXAMPLE, encoding="utf-8") as f:
        text = f.read()
    for key in ("socket", "dir"):
        text = re.sub(rf"^# ({key} = )", r"\1", text, flags=re.M)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o600)
    cfg = config.load(path)
    assert cfg.notify.socket == DEFAULT_NOTIFY_SOCKET  # the clients' defaults
    assert cfg.control.socket == DEFAULT_CONTROL_SOCKET
    assert cfg.metrics.dir == "/run/prometheus-node-exporter"
