"""FreeBSD integration files, checked as far as Linux allows.

The man page against the real argument parsers (the daemon's, status's,
hook's and the simulator's); the devd rules' stop action run for real (procps
pkill has the same -F and -L as FreeBSD's) on processes the test owns; the
rc.d script run by sh against a stand-in for rc.subr, its command line parsed
with daemon(8)'s options and then by our own parser.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from agent.cli import daemon_parser
from agent.clients.cli import hook_parser, status_parser
from agent.simulator.command import parser as simulator_parser
from tests.helpers import REPO

pytestmark = pytest.mark.freebsd_model

MAN = os.path.join(REPO, "man", "hv-vss-agent.8")
DEVD = os.path.join(REPO, "etc", "devd", "hv-vss-agent.conf")
RC = os.path.join(REPO, "etc", "rc.d", "hv_vss_agent")

# daemon(8), FreeBSD 14: flags, and options that take an argument.
DAEMON_FLAGS = set("cfHrS")
DAEMON_ARGS = set("pPtumosTlRC")


def parser_options(parser: argparse.ArgumentParser | None = None) -> set[str]:
    """Every option the parser takes, its subcommands' included."""
    found: set[str] = set()
    for a in (parser or daemon_parser())._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                found |= parser_options(sub)
        elif a.help != argparse.SUPPRESS:
            found |= set(a.option_strings)
    return found


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# --- the man page ------------------------------------------------------------------


def test_man_page_renders_without_a_warning():
    out = subprocess.run(["groff", "-mdoc", "-Tutf8", "-ww", "-P-c", MAN],
                         capture_output=True, text=True, check=True)
    assert out.stderr == ""
    assert "HV-VSS-AGENT(8)" in out.stdout


def flags(text: str) -> set[str]:
    """`Fl n`, `Fl dhn` and `Fl -config` as the options they name."""
    found: set[str] = set()
    for word in re.findall(r"Fl (-?[\w-]+)", text):
        found |= {f"-{word}"} if word.startswith("-") else {f"-{c}" for c in word}
    return found


def man_section(text: str, name: str) -> str:
    section = re.search(rf"^\.Sh {name}$(.*?)^\.Sh ", text, re.S | re.M)
    assert section is not None, name
    return section.group(1)


@pytest.mark.parametrize(("section", "command", "parser"), [
    ("OPTIONS", None, daemon_parser),
    ("STATUS", "status", status_parser),
    ("HOOKS", "hook", hook_parser),
    ("SIMULATOR", "simulator", simulator_parser),
])
def test_man_page_documents_exactly_the_parsers_options(section, command, parser):
    text = read(MAN)
    # The first list of the section is the command's options.
    options = re.search(r"^\.Bl -tag(.*?)^\.El$", man_section(text, section), re.S | re.M)
    assert options is not None
    items = re.findall(r"^\.It (.*)$", options.group(1), re.M)
    documented = {f"-{name}" for item in items for name in re.findall(r"Fl (-?[\w-]+)", item)}
    assert documented == parser_options(parser())

    # SYNOPSIS: one .Nm line per form; the clients' forms start with their command.
    forms = re.split(r"^\.Nm$", man_section(text, "SYNOPSIS"), flags=re.M)[1:]
    mine = [f for f in forms if re.match(rf"\n\.Cm {command}[ \n]", f)] if command else \
        [f for f in forms if not re.match(r"\n\.Cm ", f)]
    assert mine
    helps = {"--help", "-h"} if command else {"--help"}  # the daemon's -h is in [-dhn]
    assert set().union(*map(flags, mine)) == parser_options(parser()) - helps


def test_man_page_synopsis_gives_each_simulator_command_its_own_options():
    forms = re.split(r"^\.Nm$", man_section(read(MAN), "SYNOPSIS"), flags=re.M)[1:]
    commands = subcommands(simulator_parser())
    named: list[str] = []
    for form in forms:
        m = re.match(r"\n\.Cm simulator (.*)\n", form)
        for name in m.group(1).split(" | ") if m else ():
            named.append(name)
            assert flags(form) == parser_options(commands[name]) - {"-h", "--help"}, name
    assert sorted(named) == sorted(commands)


def test_man_page_keeps_the_code_s_meaning_of_n_and_d():
    text = read(MAN)
    assert ".It Fl n\nStay in the foreground" in text
    assert ".It Fl d\nDebug output." in text
    helps = {a.option_strings[0]: a.help for a in daemon_parser()._actions}
    assert helps["-n"].startswith("stay in the foreground") and helps["-d"] == "debug output"


# --- devd -----------------------------------------------------------------------------


def devd_rules() -> list[tuple[int, dict[str, str], str]]:
    rules = []
    for prio, body in re.findall(r"^notify (\d+) \{(.*?)^\};", read(DEVD), re.S | re.M):
        matches = dict(re.findall(r'match "(\w+)"\s+"([^"]*)";', body))
        (action,) = re.findall(r'action "([^"]*)";', body)
        rules.append((int(prio), matches, action))
    return rules


def test_devd_rules_outrank_the_stock_ones_and_name_our_rc_script():
    rules = devd_rules()
    assert [(m["type"], m["cdev"]) for _, m, _ in rules] == [
        ("CREATE", "hv_fsvss_dev"), ("DESTROY", "hv_fsvss_dev")]
    assert all(p > 11 for p, _, _ in rules)  # /etc/devd/hyperv.conf uses 11
    assert all((m["system"], m["subsystem"]) == ("DEVFS", "CDEV") for _, m, _ in rules)
    assert rules[0][2] == "/usr/sbin/service hv_vss_agent onestart"
    assert re.search(r'^name="hv_vss_agent"$', read(RC), re.M)


def destroy_action(pidfile: str) -> list[str]:
    action = devd_rules()[1][2]
    assert "/var/run/hv_vss_agent.pid" in action
    return action.replace("/var/run/hv_vss_agent.pid", pidfile).split()


HOLDER = """\
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as pidfile(3) does
os.write(fd, b"%d\\n" % os.getpid())
print("ready", flush=True)
time.sleep(60)
"""


def test_devd_stop_finds_the_process_that_holds_the_pidfile(tmp_path):
    pidfile = str(tmp_path / "hv_vss_agent.pid")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, pidfile], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        subprocess.run(destroy_action(pidfile), check=True, timeout=30)
        assert holder.wait(10) == -signal.SIGTERM
    finally:
        holder.kill()
        holder.wait()


def test_devd_stop_leaves_alone_whoever_a_stale_pidfile_names(tmp_path):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pidfile = tmp_path / "hv_vss_agent.pid"
        pidfile.write_text(f"{bystander.pid}\n")  # left behind, locked by no one
        stop = subprocess.run(destroy_action(str(pidfile)), check=False, timeout=30,
                              capture_output=True, text=True)
        assert stop.returncode != 0
        time.sleep(0.2)
        assert bystander.poll() is None, "an unrelated process was signalled"
    finally:
        bystander.kill()
        bystander.wait()


# --- rc.d -------------------------------------------------------------------------------


STUB = """\
load_rc_config() { :; }
run_rc_command() {
    for word in $command $rc_flags $command_args; do printf 'argv %s\\n' "$word"; done
    printf 'pidfile %s\\nprocname %s\\nrcvar %s\\nrequired %s\\n' \\
        "$pidfile" "$procname" "$rcvar" "$required_files"
}
"""


def run_rc(tmp_path, **env: str) -> tuple[list[str], dict[str, str]]:
    stub = tmp_path / "rc.subr"
    stub.write_text(STUB)
    script = tmp_path / "hv_vss_agent"
    script.write_text(read(RC).replace(". /etc/rc.subr", f". {stub}"))
    out = subprocess.run(["sh", str(script), "start"], env={"PATH": "/usr/bin:/bin", **env},
                         capture_output=True, text=True, check=True, timeout=30)
    argv, facts = [], {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key == "argv":
            argv.append(value)
        else:
            facts[key] = value
    return argv, facts


def split_daemon(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """daemon(8)'s options, then the command it runs."""
    assert argv[0] == "/usr/sbin/daemon"
    opts, i = {}, 1
    while i < len(argv) and argv[i].startswith("-"):
        flag = argv[i][1:]
        if flag in DAEMON_FLAGS:
            opts[flag] = ""
        elif flag in DAEMON_ARGS:
            opts[flag] = argv[i + 1]
            i += 1
        else:
            raise AssertionError(f"daemon(8) has no option {argv[i]}")
        i += 1
    return opts, argv[i:]


def test_rc_script_is_valid_sh():
    subprocess.run(["sh", "-n", RC], check=True)


def test_rc_script_runs_the_agent_under_daemon_with_the_devd_pidfile(tmp_path):
    argv, facts = run_rc(tmp_path)
    opts, command = split_daemon(argv)
    assert opts["P"] == facts["pidfile"] == "/var/run/hv_vss_agent.pid"
    assert "r" in opts and int(opts["R"]) > 0 and "S" in opts
    assert (facts["procname"], facts["rcvar"]) == ("/usr/sbin/daemon", "hv_vss_agent_enable")
    assert command[0] == "/usr/local/bin/hv-vss-agent"
    args = daemon_parser().parse_args(command[1:])
    assert (args.foreground, args.debug, args.config) == (True, False, None)


def test_rc_script_passes_rc_conf_settings_to_the_agent(tmp_path):
    argv, facts = run_rc(tmp_path, hv_vss_agent_args="-d",
                         hv_vss_agent_config="/usr/local/etc/vss.toml")
    _, command = split_daemon(argv)
    args = daemon_parser().parse_args(command[1:])
    assert (args.foreground, args.debug, args.config) == (True, True, "/usr/local/etc/vss.toml")
    assert facts["required"] == "/usr/local/etc/vss.toml"

