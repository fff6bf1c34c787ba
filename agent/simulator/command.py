"""`hv-vss-agent simulator`: a simulated host that stays up, driven by hand.

  hv-vss-agent simulator serve PATH [--protocol linux|freebsd]
      serve a driver model on the Unix socket PATH, the agent's --device,
      until interrupted, and print what happens on it;
  hv-vss-agent simulator check|freeze|thaw PATH
      from another terminal: send that host request and print the answer.

The host's requests reach `serve` over a second socket, PATH.host, both
sockets mode 0600 (as the device node is root's only).  A request is one
record naming the operation; the answer one JSON record, what the host got.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn

from agent.clients.cli import seconds
from agent.platforms import NATIVE_PROTOCOL
from agent.simulator.host import OPS, HostRequest
from agent.simulator.server import Simulator

EXIT_USAGE = 2
HOST_SUFFIX = ".host"
DEFAULT_WAIT = 1000.0  # longer than any driver timeout (Linux's FREEZE: 900 s)
_MODELS = {"linux": "drivers/hv/hv_snapshot.c", "freebsd": "sys/dev/hyperv/utilities/hv_snapshot.c"}


class CommandError(Exception):
    """Ends the command with one line on stderr and exit status 1."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message} (try -h)\n")
        raise SystemExit(EXIT_USAGE)


def parser() -> Parser:
    p = Parser(prog="hv-vss-agent simulator",
               description="A simulated Hyper-V host and kernel VSS driver on a Unix socket, "
                           "to try the agent by hand.")
    sub = p.add_subparsers(dest="command", required=True, metavar="serve|check|freeze|thaw",
                           parser_class=Parser)
    serve = sub.add_parser("serve", help="serve the driver model on PATH until interrupted")
    serve.add_argument("path", metavar="PATH", help="the socket to create: the agent's --device")
    serve.add_argument("--protocol", choices=("linux", "freebsd"), default=NATIVE_PROTOCOL,
                       help="which kernel's driver to model (default: this system's)")
    for op in OPS:
        one = sub.add_parser(op, help=f"send the host's {op.upper()} and print the answer")
        one.add_argument("path", metavar="PATH", help="the socket `serve` made")
        one.add_argument("--timeout", type=seconds, default=DEFAULT_WAIT, metavar="SECONDS",
                         help=f"give up waiting after this long (default {DEFAULT_WAIT:g})")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args.path, args.protocol)
        return ask(args.path, args.command, args.timeout)
    except CommandError as e:
        sys.stderr.write(f"hv-vss-agent simulator {args.command}: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130


# --- serve --------------------------------------------------------------------------------


def serve(path: str, protocol: str) -> int:
    host_path = path + HOST_SUFFIX
    for p in (path, host_path):
        _refuse_to_replace(p)
    t0 = time.monotonic()
    say_lock = threading.Lock()

    def say(text: str) -> None:
        with say_lock:
            print(f"{time.monotonic() - t0:9.3f}s  {text}", flush=True)

    sim = Simulator(path, protocol)
    sim.on_event = say
    try:
        sim.start()
    except OSError as e:
        raise CommandError(f"cannot serve on {path}: {e.strerror or e}") from None
    try:
        host = _listen(host_path)
    except OSError as e:
        sim.stop()
        raise CommandError(f"cannot serve on {host_path}: {e.strerror or e}") from None
    print(f"the {protocol} driver model ({_MODELS[protocol]}) serves on {path}\n"
          f"  the agent:  hv-vss-agent -n --device {path} --config FILE   (as root)\n"
          f"  the host:   hv-vss-agent simulator check|freeze|thaw {path}\n"
          "  Ctrl-C stops it", flush=True)
    stop = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, lambda _n, _f: stop.set())
    threading.Thread(target=_accept_host, args=(host, sim, say), name="host-requests",
                     daemon=True).start()
    try:
        while not stop.wait(3600):
            pass
    finally:
        host.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(host_path)
        sim.stop()
        say("stopped")
    return 0


def _refuse_to_replace(path: str) -> None:
    """A socket left behind by an earlier run may go; a live one, or anything else, not."""
    if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise CommandError(f"{path} exists and is not a socket: choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with probe, contextlib.suppress(OSError):
        probe.connect(path)
        raise CommandError(f"{path} is in use: a simulator already serves there")


def _listen(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # _refuse_to_replace said it is a dead socket, if anything
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.bind(path)
        os.chmod(path, 0o600)
        s.listen(8)
    except OSError:
        s.close()
        raise
    return s


def _accept_host(host: socket.socket, sim: Simulator, say: Callable[[str], None]) -> None:
    while True:
        try:
            conn, _ = host.accept()
        except OSError:
            return  # closed: serve is stopping
        threading.Thread(target=_host_request, args=(conn, sim, say), daemon=True).start()


def _host_request(conn: socket.socket, sim: Simulator, say: Callable[[str], None]) -> None:
    with conn:
        try:
            op = conn.recv(64).decode("ascii", "replace")
        except OSError:
            return
        if op not in OPS:
            with contextlib.suppress(OSError):
                conn.send(json.dumps({"error": f"unknown request {op[:20]!r}"}).encode())
            return
        say(f"host {op.upper()} sent")
        req = sim.send(op)
        while not _answered(sim, req):
            if _hung_up(conn):  # the client gave up: the request stays with the driver
                return
        say(f"host {op.upper()} -> {_hresult(req.status)} ({_by(req)}, "
            f"{req.latency * 1e3:.1f} ms)")
        with contextlib.suppress(OSError):
            conn.send(json.dumps(_answer(op, req)).encode())


def _answered(sim: Simulator, req: HostRequest) -> bool:
    try:
        sim.wait(req, 0.5)
    except TimeoutError:
        return False
    return True


def _hung_up(conn: socket.socket) -> bool:
    try:
        return conn.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _answer(op: str, req: HostRequest) -> dict[str, object]:
    return {"op": op, "status": req.status, "answered_by": req.answered_by,
            "latency": req.latency, "flags": req.flags,
            "daemon_reply": req.daemon_reply.hex() if req.daemon_reply is not None else None}


# --- check, freeze, thaw -------------------------------------------------------------------


def ask(path: str, op: str, timeout: float) -> int:
    """Send one host request through `serve`; exit 0 if the host got HV_S_OK."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with s:
        try:
            s.connect(path + HOST_SUFFIX)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise CommandError(f"no simulator serves on {path} (start `hv-vss-agent "
                                   f"simulator serve {path}` first)") from None
            raise CommandError(f"cannot reach the simulator at {path}{HOST_SUFFIX}: "
                               f"{e.strerror or e}") from None
        s.settimeout(timeout)
        try:
            s.send(op.encode())
            record = s.recv(4096)
        except TimeoutError:
            raise CommandError(f"no answer within {timeout:g} s (the FreeBSD driver ignores "
                               "a request that arrives while another is pending)") from None
        except OSError as e:
            raise CommandError(f"the simulator went away: {e.strerror or e}") from None
    if not record:
        raise CommandError("the simulator stopped before the answer")
    try:
        answer = json.loads(record)
        if "error" in answer:
            raise CommandError(str(answer["error"]))
        line, ok = describe(answer), answer["status"] == 0
    except (ValueError, KeyError, TypeError):
        raise CommandError(f"not an answer from a simulator: {record[:60]!r}") from None
    print(line)
    return 0 if ok else 1


def describe(answer: dict[str, object]) -> str:
    """One line: what the host got, who answered, how fast, and the daemon's bytes."""
    status = answer["status"]
    by = str(answer["answered_by"])
    line = (f"{str(answer['op']).upper()}: "
            f"{_hresult(status if isinstance(status, int) else None)}, {_BY.get(by, by)}, "
            f"after {float(str(answer['latency'])) * 1e3:.1f} ms")
    if answer.get("flags"):
        line += f", flags {answer['flags']}"
    raw = answer.get("daemon_reply")
    if isinstance(raw, str):
        line += f"; the daemon wrote {bytes.fromhex(raw).hex(' ', 4)}"
    return line


_BY = {"daemon": "answered by the daemon", "kernel": "answered by the kernel itself",
       "timeout": "the driver's timeout", "reset": "the daemon closed the device",
       "app": "answered by the application"}


def _by(req: HostRequest) -> str:
    return _BY.get(req.answered_by, req.answered_by)


def _hresult(status: int | None) -> str:
    if status is None:
        return "no answer"
    return "HV_S_OK" if status == 0 else f"HV_E_FAIL (0x{status:08x})"
