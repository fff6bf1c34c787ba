"""Config parsing: every mistake is one clear line; root refuses files others could change."""

from __future__ import annotations

import os
import socket

import pytest

from agent import config
from agent.engine import daemon
from agent.engine.root import Prepared
from privileged.child_config import ChildConfig, ConfigError, parse_child_sections, read_config
from privileged.toml_subset import parse_toml


def load_child_config(path: str | None) -> ChildConfig:
    """The child's sections as the child reads them (privileged/child.py)."""
    if path is None:
        return ChildConfig()
    return parse_child_sections(parse_toml(read_config(path), path))


def write(path: str, text: str, mode: int = 0o600) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def test_defaults():
    cfg = config.parse({}, None)
    assert (cfg.user, cfg.chroot, cfg.log_target) == ("hvvss", "/var/empty", "syslog")
    assert cfg.child.watchdog.max_frozen_seconds == 60.0
    assert (cfg.child.watchdog.budget_seconds, cfg.child.watchdog.budget_seconds_per_hour) == \
        (120.0, 240.0)
    assert cfg.child.state.dir == "/run/hv-vss-agent"
    assert cfg.device_path == "/dev/vmbus/hv_vss"
    assert cfg.syslog_socket == "/dev/log"
    assert config.parse({"device": {"protocol": "freebsd"}}, None).device_path == \
        "/dev/hv_fsvss_dev"


def test_integer_ranges_include_both_ends():
    low = config.parse({"agent": {"history": 1}, "log": {"buffer": 10}}, None)
    high = config.parse({"agent": {"history": 10000}, "log": {"buffer": 1_000_000}}, None)
    assert (low.history, low.log_buffer, high.history, high.log_buffer) == \
        (1, 10, 10000, 1_000_000)


@pytest.mark.parametrize(("doc", "message"), [
    ({"bogus": {}}, "unknown section [bogus]"),
    ({"freeze": {"onyl": []}}, "[freeze]: unknown key 'onyl'"),
    ({"freeze": {"only": "/mnt"}}, "[freeze] only: expected a list of non-empty strings"),
    ({"freeze": {"only": ["mnt"]}}, "[freeze] only: 'mnt' is not an absolute path"),
    ({"freeze": {"presync": "yes"}}, "[freeze] presync: expected true or false"),
    ({"freeze": {"rcu_expedited": 1}}, "[freeze] rcu_expedited: expected true or false"),
    ({"check": {"mode": "lenient"}}, "[check] mode: expected one of default, strict"),
    ({"watchdog": {"max_frozen_seconds": 0}}, "[watchdog] max_frozen_seconds: 0 is outside"),
    ({"watchdog": {"max_frozen_seconds": True}}, "expected a number"),
    ({"watchdog": {"budget_seconds_per_hour": float("nan")}}, "expected a number"),
    ({"watchdog": {"max_frozen_seconds": 60, "budget_seconds": 30}},
     "[watchdog] budget_seconds: 30 is outside 60..86400"),
    ({"watchdog": {"cooldown_seconds": 5}}, "[watchdog] cooldown_seconds: no longer a setting"),
    ({"agent": {"user": ""}}, "[agent] user: expected a non-empty string"),
    ({"agent": {"history": 0}}, "[agent] history: 0 is outside 1..10000"),
    ({"agent": {"history": 50.0}}, "[agent] history: expected an integer"),
    ({"agent": {"history": "50"}}, "[agent] history: expected an integer"),
    ({"log": {"buffer": 1_000_001}}, "[log] buffer: 1000001 is outside 10..1000000"),
    ({"agent": "hvvss"}, "[agent] must be a table"),
    ({"log": {"target": "file"}}, "[log] target: expected one of syslog, stderr"),
    ({"notify": {"policy": "maybe"}}, "[notify] policy: expected one of fail, skip"),
])
def test_errors_are_one_line_and_name_the_key(doc, message):
    with pytest.raises(ConfigError) as e:
        config.parse(doc, None)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_child_reads_only_its_sections_with_the_same_rules():
    child = parse_child_sections({"freeze": {"only": ["/a/../b"]}, "notify": {"x": 1}})
    assert child.freeze.only == ("/b",)
    with pytest.raises(ConfigError, match=r"\[freeze\] only"):
        parse_child_sections({"freeze": {"only": 3}})


def test_file_errors(workdir):
    good = write(os.path.join(workdir, "good.toml"), '[freeze]\nonly = ["/x"]\n')
    assert config.load(good).child.freeze.only == ("/x",)
    assert load_child_config(good).freeze.only == ("/x",)

    bad_toml = write(os.path.join(workdir, "bad.toml"), "[freeze\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        config.load(bad_toml)
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(os.path.join(workdir, "missing.toml"))
    with pytest.raises(ConfigError, match=r"good\.toml: \[freeze\]: unknown key"):
        config.load(write(good, "[freeze]\nnope = 1\n"))
    # root's, but not a file open(2) can open: a listening socket
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(os.path.join(workdir, "socket.toml"))
        with pytest.raises(ConfigError, match=r"socket\.toml: No such device or address$"):
            config.load(os.path.join(workdir, "socket.toml"))
    # a regular file, root's, that opens and then fails to read (address 0 is not mapped)
    with pytest.raises(ConfigError, match=r"^cannot read config file /proc/self/mem: Input/"):
        config.load("/proc/self/mem")


def test_a_file_the_child_would_read_differently_is_refused_before_anything_is_served(
        workdir, monkeypatch):
    """Root reads the file with tomllib; unprivileged, the parent reads it again with the
    child's own reader: should they ever differ (the fuzz test says they do not), it stops
    first thing, before it waits for the child or touches the device (neither exists
    here: anything else would fail otherwise)."""
    good = write(os.path.join(workdir, "good.toml"), '[freeze]\nonly = ["/x"]\n')
    cfg = config.load(good)
    prep = Prepared(cfg, device_fd=-1, account=None, chroot_fd=None)  # no child: none started
    monkeypatch.setattr(daemon, "parse_toml", lambda text, path: {"freeze": {"only": ["/y"]}})
    with pytest.raises(ConfigError, match=r"good\.toml: the root child reads it differently"):
        daemon.run(prep)


def test_root_refuses_a_config_others_could_change(workdir):
    path = write(os.path.join(workdir, "c.toml"), "", mode=0o666)
    with pytest.raises(ConfigError, match=r"refusing config file .*writable by group or others"):
        config.load(path)
    os.chmod(path, 0o600)
    os.chown(path, 999, 999)
    with pytest.raises(ConfigError, match="owned by uid 999, not root"):
        config.load(path)
    os.chown(path, 0, 0)
    os.chmod(workdir, 0o777)  # the directory above: anyone could swap the file
    with pytest.raises(ConfigError, match="is writable by group or others"):
        config.load(path)


def test_rcu_expedited_is_read_by_the_child_s_reader_and_accepted_by_the_parent(workdir):
    path = write(os.path.join(workdir, "rcu.toml"), "[freeze]\nrcu_expedited = true\n")
    assert load_child_config(path).freeze.rcu_expedited is True  # the child's own reader
    assert config.load(path).child.freeze.rcu_expedited is True  # the parent's validator
    assert load_child_config(None).freeze.rcu_expedited is False  # off by default


def test_the_shipped_example_config_parses_to_the_defaults(workdir):
    import shutil

    from tests.helpers import REPO

    path = os.path.join(workdir, "example.toml")
    shutil.copy(os.path.join(REPO, "etc", "hv-vss-agent.toml"), path)
    os.chmod(path, 0o600)
    assert config.load(path) == config.AgentConfig(path=path)
