"""Fuzzing what parses untrusted input: kernel messages, child records, config, mountinfo.

Every parser answers arbitrary input with a value or its own one-line error
(KernelProtocolError, WireError, ConfigError), never another exception; the
real agent survives malformed records on its kernel channel, and the command
line answers a broken config file with one line and exit 1.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import string
import struct
import subprocess
import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import config
from agent.engine.child_link import ChildGone, ChildLink
from agent.kernel import freebsd_wire as fw
from agent.kernel import linux_wire as lw
from agent.kernel.channel import KernelChannel, KernelLost
from agent.kernel.messages import KernelProtocolError
from agent.kernel.protocol import PROTOCOLS
from agent.kernel.transport import SocketEndpoint
from agent.simulator import wire as sim_wire
from privileged import wire
from privileged.budget import Bucket
from privileged.config import CHILD_SECTIONS, ConfigError
from privileged.mounts_linux import parse_mountinfo, unescape
from privileged.statefile import StateDir
from privileged.toml_subset import parse_toml
from tests.helpers import PY, REPO, running_agent, wait_for, write_config

FAST = settings(max_examples=1500, deadline=None)
SLOW = settings(max_examples=15, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# --- the kernel channel: Linux -------------------------------------------------------------


@FAST
@given(st.one_of(st.binary(max_size=80), st.binary(min_size=12, max_size=12)))
def test_linux_request_parser_takes_anything(frame):
    try:
        req = lw.decode_request(frame)
    except KernelProtocolError as e:
        assert len(frame) != lw.MSG_SIZE and str(e)
        return
    assert req.raw == frame and req.code == frame[0]
    assert (req.op is None) == (frame[0] not in (2, 5, 6))
    for ok in (True, False):
        reply = lw.encode_reply(req, ok)
        assert reply[4:] == frame[4:] and len(reply) == lw.MSG_SIZE
        assert struct.unpack_from("<I", reply)[0] == (lw.HV_S_OK if ok else lw.HV_E_FAIL)


@FAST
@given(st.binary(max_size=16))
def test_linux_register_answer_parser_takes_anything(data):
    try:
        assert lw.decode_register_answer(data) == struct.unpack("<I", data)[0]
    except KernelProtocolError:
        assert len(data) != 4


# --- the kernel channel: FreeBSD --------------------------------------------------------------


@FAST
@given(st.one_of(st.binary(max_size=130), st.binary(min_size=64, max_size=64)))
def test_freebsd_request_parser_takes_anything(frame):
    try:
        req = fw.decode_request(frame)
    except KernelProtocolError:
        assert len(frame) != fw.MSG_SIZE
        return
    opt, status, msgid, _ = fw.MSG.unpack(frame)
    if status != fw.VSS_SUCCESS:
        assert req is None  # nothing was pending
        return
    assert req is not None and (req.code, req.msgid) == (opt, msgid)
    for ok in (True, False):
        r_opt, r_status, r_msgid, reserved = fw.MSG.unpack(fw.encode_reply(req, ok))
        assert (r_opt, r_msgid, reserved) == (opt, msgid, bytes(48))
        assert r_status == (fw.VSS_SUCCESS if ok else fw.VSS_FAIL)


@FAST
@given(st.lists(st.binary(max_size=100), min_size=1, max_size=5),
       st.sampled_from(["linux", "freebsd"]))
def test_kernel_channel_turns_any_record_into_a_request_or_its_own_error(records, protocol):
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel = KernelChannel(SocketEndpoint(ours.detach(), protocol), PROTOCOLS[protocol])
    try:
        for record in records:  # what the next read (or IOCHVVSSREAD) returns
            kernel.send(sim_wire.encode(sim_wire.Result(
                len(record) if protocol == "linux" else 0, record)))
            size = fw.MSG_SIZE if protocol == "freebsd" else lw.MSG_SIZE
            try:
                channel.read_request()
            except KernelProtocolError:
                assert len(record) not in (0, size)
            except KernelLost:
                assert record == b""  # a read that returns nothing is end of file
            else:
                assert len(record) == size
    finally:
        channel.close()
        kernel.close()


@FAST
@given(st.binary(max_size=300))
def test_simulator_records_parse_or_raise_their_own_error(record):
    """Both ends of the simulator's socket: a record is a call or an answer, or WireError."""
    for decode in (sim_wire.decode_request, sim_wire.decode_answer):
        try:
            msg = decode(record)
        except sim_wire.WireError:
            continue
        assert sim_wire.encode(msg) == record


@FAST
@given(st.one_of(st.binary(min_size=1, max_size=300),
                 st.integers(-2**31, 2**31 - 1).map(
                     lambda ret: sim_wire.encode(sim_wire.Result(ret, b"x")))))
def test_the_agent_side_of_the_simulator_turns_any_answer_into_data_or_oserror(record):
    """Any record where the answer to a read is due: data, or OSError (then KernelLost)."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    endpoint = SocketEndpoint(ours.detach(), "linux")
    done = sim_wire.encode(sim_wire.Result(12, bytes(12)))  # ends a read a READY left waiting
    try:
        kernel.send(record)
        kernel.send(done)
        try:
            data = endpoint.read()
        except OSError:
            return
        answer = sim_wire.decode_answer(record)
        assert data == (answer.data if isinstance(answer, sim_wire.Result) else bytes(12))
    finally:
        endpoint.close()
        kernel.close()


def test_the_agent_survives_garbage_on_its_kernel_channel(workdir, make_fs):
    """Records of every wrong size, from the simulator: each one costs the agent its
    channel (it reopens and registers again), never its life."""
    fs = make_fs("ext4")
    sizes = [1, 4, 11, 13, 64, 256]
    with running_agent(workdir, [fs.mountpoint]) as agent:
        for n, size in enumerate(sizes, start=2):
            agent.sim.inject(os.urandom(size))
            agent.wait_registered(connections=n)
            assert agent.sim.request("check").status == 0
        assert agent.proc is not None and agent.proc.poll() is None
        assert wait_for(lambda: agent.log().count("kernel channel:") == len(sizes))


# --- the child's records, as the parent reads them ------------------------------------------------


@FAST
@given(st.one_of(st.binary(max_size=1100),
                 st.tuples(st.sampled_from([0x81, 0x82, 0x83, 0x84]), st.binary(max_size=300))
                 .map(lambda t: bytes([1, t[0]]) + t[1])))
def test_child_record_parser_takes_anything(record):
    try:
        wire.decode_child(record)
    except wire.WireError as e:
        assert str(e)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1100))
def test_parent_link_turns_any_child_record_into_a_message_or_childgone(record):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    class NoProcess:
        pid = 0

    link = ChildLink(ours, NoProcess())  # type: ignore[arg-type]
    try:
        theirs.send(record)
        try:
            link.receive()
        except ChildGone as e:
            assert str(e)
    finally:
        link.close()
        theirs.close()


# --- the config file ----------------------------------------------------------------------------

KNOWN = {
    "agent": ["user", "chroot", "history"], "device": ["path", "protocol"],
    "log": ["target", "buffer", "syslog_socket"], "freeze": ["only", "exclude", "presync"],
    "check": ["mode", "zfs"],
    "watchdog": ["max_frozen_seconds", "budget_seconds", "budget_seconds_per_hour"],
    "state": ["dir"], "notify": ["socket", "allow_users", "allow_groups", "timeout", "policy",
                                 "budget"],
    "control": ["socket", "admin_group"], "metrics": ["dir"],
}
SCALARS = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(),
                    st.text(max_size=20), st.sampled_from(["/", "/x/../y", "", "\0", "syslog",
                                                           "strict", "freebsd", "hvvss"]),
                    st.datetimes(), st.dates(), st.times())
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, object]:
    doc: dict[str, object] = {}
    for section in draw(st.lists(st.sampled_from([*KNOWN, "bogus"]), max_size=5, unique=True)):
        keys = draw(st.lists(st.sampled_from([*KNOWN.get(section, []), "nope"]), max_size=4,
                             unique=True))
        doc[section] = draw(st.one_of(
            st.fixed_dictionaries({k: VALUES for k in keys}), SCALARS))
    return doc


@settings(max_examples=1500, deadline=None)
@given(documents())
def test_config_parser_takes_any_document(doc):
    try:
        cfg = config.parse(doc, "/etc/hv-vss-agent.toml")
    except ConfigError as e:
        text = str(e)
        assert text and "\n" not in text
        return
    assert set(doc) <= set(KNOWN)  # accepted: then nothing unknown was in it
    assert cfg.child.watchdog.max_frozen_seconds > 0


VALID = """\
[agent]
user = "hvvss"
chroot = "/var/empty"
[freeze]
only = ["/srv"]
[watchdog]
max_frozen_seconds = 30
budget_seconds = 120
[log]
target = "stderr"
"""


@settings(max_examples=500, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.binary(max_size=300),
    st.tuples(st.integers(0, len(VALID)), st.integers(0, 40),
              st.text(string.printable + "\xff\u2028", max_size=12))
    .map(lambda t: (VALID[:t[0]] + t[2] + VALID[t[0] + t[1]:]).encode("utf-8", "surrogatepass"))))
def test_config_loader_takes_any_file(workdir, data):
    path = os.path.join(workdir, "fuzz.toml")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    try:
        config.load(path)
    except ConfigError as e:
        text = str(e)
        assert path in text and "\n" not in text


# The root child reads the file without tomllib: a subset, refused where it ends, never read
# differently.  Documents drawn mostly inside the subset, with TOML it does not read mixed in.
TOML_KEYS = st.sampled_from(["a", "b", "only", "x-y", "k_1", "1", "a.b", '"q"', "é", "a b"])
TOML_ATOMS = st.sampled_from([
    "true", "false", "0", "-0", "+1", "12", "01", "1.5", "-0.25", "1.", ".5", "1e5", "1E+05",
    "2.5e-3", "1e", "1_0", "inf", "nan", "0x10", "1979-05-27", "yes", '"s"', "'lit'", '""',
    "''", '"a#b"', "'a\\b'", '"a\\"b"', '"\\u00e9"', '"""m"""', "'''m'''", "{a = 1}",
    '"/srv/a b"', '"tab\there"', '"unterminated', "'x'y", "[]", "[ ]", "1 2"])
TOML_VALUES = st.recursive(TOML_ATOMS, lambda inner: st.tuples(
    st.lists(inner, max_size=4), st.sampled_from([", ", ",", ",\n  ", " ,# c\n"]),
    st.booleans()).map(lambda t: "[" + t[1].join(t[0]) + ("," if t[2] and t[0] else "") + "]"),
    max_leaves=6)
TOML_LINES = st.one_of(
    st.tuples(TOML_KEYS, st.sampled_from([" = ", "=", " =", "\t=\t"]), TOML_VALUES,
              st.sampled_from(["", " # note", "  #", " x"])).map("".join),
    st.tuples(st.sampled_from(["[", "[ ", "[[", " ["]), TOML_KEYS,
              st.sampled_from(["]", " ]", "]]", "] # t", "]x"])).map("".join),
    st.sampled_from(["", "# comment", "   ", "\t# indented", "\r", "\x00", "\x7f", "[freeze]",
                     "[state]"]))


@FAST
@given(st.lists(TOML_LINES, max_size=8).map("\n".join))
def test_the_child_s_toml_reader_never_reads_what_tomllib_reads_differently(text):
    try:
        mine = parse_toml(text, "/etc/hv-vss-agent.toml")
    except ConfigError as e:
        assert "\n" not in str(e) and "/etc/hv-vss-agent.toml, line " in str(e)
        mine = None
    try:
        theirs = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        theirs = None
    if mine is not None:
        assert mine == theirs, text  # accepted: exactly what TOML means
    if theirs is None:
        assert mine is None, text  # never accepts what TOML refuses


def test_the_child_s_toml_reader_reads_the_shipped_example_as_tomllib_does():
    with open(os.path.join(REPO, "etc", "hv-vss-agent.toml"), encoding="utf-8") as f:
        text = f.read()
    assert parse_toml(text, "example") == tomllib.loads(text)
    multi = '[freeze]\nonly = [\n  "/srv",  # the data\n  \'/var/lib/db\',\n]\n'
    assert parse_toml(multi, "m") == tomllib.loads(multi) == \
        {"freeze": {"only": ["/srv", "/var/lib/db"]}}
    spaced = '[freeze]\nonly = [\n  "/srv" ,  # the data\n  "/var/lib/db"\n]\n'  # no last comma
    assert parse_toml(spaced, "s") == tomllib.loads(spaced) == \
        {"freeze": {"only": ["/srv", "/var/lib/db"]}}


@pytest.mark.parametrize("number", ["0", "-0", "+1", "12", "-7", "1.5", "-0.25", "+2.5",
                                    "1e5", "1E+05", "-2.5e-3"])
def test_the_child_s_toml_reader_reads_signed_numbers_as_tomllib_does(number):
    text = f"[watchdog]\nmax_frozen_seconds = {number}\n"
    assert parse_toml(text, "n") == tomllib.loads(text)


@pytest.mark.parametrize(("text", "says", "toml"), [
    ('[freeze]\nonly = ["/a\\tb"]\n', "line 2: a backslash", True),
    ('[freeze]\n\nonly = """/a"""\n', "line 3: a multi-line string", True),
    ("freeze.only = []\n", "line 1: expected '='", True),
    ("[watchdog]\nmax_frozen_seconds = 1_000\n", "line 2: '1_000' is not a value", True),
    ("[freeze]\npresync = yes\n", "line 2: 'yes' is not a value", False),
    ("[a]\n[a]\n", "line 2: [a] appears twice", False),
])
def test_what_the_child_s_toml_reader_does_not_read_is_one_line_with_its_number(text, says,
                                                                                toml):
    if toml:  # valid TOML that the child does not read: the parent refuses it at start-up
        tomllib.loads(text)
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse_toml(text, "/etc/hv-vss-agent.toml")


@SLOW
@given(st.tuples(st.integers(0, len(VALID)), st.integers(1, 30),
                 st.text(string.printable, min_size=1, max_size=6)))
def test_command_line_answers_a_broken_config_with_one_line(workdir, cut):
    start, length, junk = cut
    text = VALID[:start] + junk + VALID[start + length:]
    path = write_config(os.path.join(workdir, "cli.toml"), [], workdir)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace('user = "hvvss"', 'user = "no-such-account"'))
    proc = subprocess.run([PY, "-m", "agent", "-n", "--config", path, "--device", "/nonexistent"],
                          capture_output=True, text=True, timeout=30, cwd=REPO, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --- what the root child parses itself -----------------------------------------------------------

FIELD = st.text(st.sampled_from(string.printable + "\\\t\u00e9"), max_size=12)


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.one_of(st.lists(FIELD, max_size=14).map(" ".join), FIELD), max_size=8))
def test_mountinfo_parser_takes_any_text(lines):
    mounts = parse_mountinfo("\n".join(lines))
    assert len(mounts) <= len(lines)  # a line it cannot read is skipped, never guessed at
    for field in lines:
        unescape(field)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_crash_and_budget_records_take_any_content(workdir, data):
    state = StateDir(os.path.join(workdir, "state"))
    for name in ("frozen", "budget"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(workdir, "state", name))
    state.open()
    for fd in state.fds():
        os.write(fd, data)
    for key, mountpoint in state.read():
        assert mountpoint.startswith("/") and key and not key.startswith("-")
    saved = state.read_budget()
    assert saved is None or all(math.isfinite(x) for x in saved)
    budget = Bucket.load(state, 10.0, 3600.0, 1000.0)
    assert 0.0 <= budget.left <= 10.0 and budget.when <= 1000.0
    for fd in state.fds():
        os.close(fd)


def test_child_sections_are_the_ones_the_fuzzer_knows():
    assert set(CHILD_SECTIONS) <= set(KNOWN)
