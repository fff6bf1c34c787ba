"""The parent's end of the link to the root child: start it, talk to it.

The child is a fresh interpreter: -I (isolated: no PYTHON* variables, no user
site directory, no current directory on sys.path), -B (no bytecode written:
it may run while filesystems are frozen) and -S (site.py does not run, so no
.pth file in site-packages can run code as root).  Its sys.path is the
standard library and nothing else: the directory above privileged/ (a
source tree, or site-packages) holds other things, and a module planted
there under a name some standard module imports must never be found.  The
package privileged itself is loaded from its own directory, which the
integrity check has verified, and its submodules only from there (its
__path__).  The environment is empty and its only inherited descriptor is
its end of the socketpair.  The parent numbers its
requests and expects each answer to echo the number.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time

import privileged
from privileged import records, wire

log = logging.getLogger("hv-vss-agent")
child_log = logging.getLogger("hv-vss-agent.child")


class ChildGone(Exception):
    """The child closed the link or sent something malformed."""


class ChildLink:
    def __init__(self, sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        self.sock = sock
        self.proc = proc
        self.seq = 0
        self.hello: wire.Hello | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def spawn(cls, config: str | None, device: str | None, debug: bool = False,
              extra: tuple[str, ...] = ()) -> ChildLink:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.set_inheritable(False)
        fd = theirs.fileno()
        argv = [sys.executable, "-I", "-B", "-S", "-c", child_bootstrap(), "--fd", str(fd),
                "--ppid", str(os.getpid())]
        if config:
            argv += ["--config", config]
        if device:
            argv += ["--device", device]
        if debug:
            argv.append("--debug")
        argv += list(extra)
        proc = subprocess.Popen(argv, pass_fds=(fd,), env={}, cwd="/", close_fds=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        theirs.close()
        return cls(ours, proc)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, op: wire.Op) -> int:
        self.seq += 1
        try:
            self.sock.send(wire.encode_request(wire.Request(op, self.seq)))
        except OSError as e:
            raise ChildGone(f"cannot send {op.name} to the child: {e.strerror}") from None
        return self.seq

    def receive(self) -> tuple[wire.ChildMessage, list[int]]:
        """One message from the child, and any descriptors it passed (REOPEN only).

        LOG records are re-emitted here and returned as well."""
        try:
            data, fds = records.receive(self.sock, wire.MAX_RECORD, max_fds=1)
        except records.RecordError as e:
            raise ChildGone(f"{e} from the child") from None
        except OSError as e:
            raise ChildGone(f"reading from the child failed: {e.strerror}") from None
        if not data:
            raise ChildGone("the child closed the link")
        try:
            msg = wire.decode_child(data)
        except wire.WireError as e:
            _close_all(fds)
            raise ChildGone(f"malformed record from the child: {e}") from None
        if fds and not (isinstance(msg, wire.Result) and msg.op is wire.Op.REOPEN):
            _close_all(fds)
            raise ChildGone("the child passed a descriptor with an unexpected record")
        if isinstance(msg, wire.Log):
            emit_child_log(msg, self.pid)
        elif isinstance(msg, wire.Result) and msg.seq != self.seq:
            _close_all(fds)
            raise ChildGone(f"answer numbered {msg.seq}, expected {self.seq}")
        return msg, fds

    def wait_hello(self, timeout: float = 20.0) -> wire.Hello:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildGone("the child did not start in time")
            self.sock.settimeout(left)
            try:
                msg, _ = self.receive()
            except TimeoutError:
                raise ChildGone("the child did not start in time") from None
            finally:
                self.sock.settimeout(None)
            if isinstance(msg, wire.Hello):
                self.hello = msg
                return msg
            if not isinstance(msg, wire.Log):
                raise ChildGone(f"expected HELLO from the child, got {msg}")

    def request(self, op: wire.Op, timeout: float = 30.0) -> tuple[wire.Result, list[int]]:
        """Synchronous request, for start-up and shutdown (the service loop is async)."""
        self.send(op)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildGone(f"no answer to {op.name} from the child")
            self.sock.settimeout(left)
            try:
                msg, fds = self.receive()
            except TimeoutError:
                raise ChildGone(f"no answer to {op.name} from the child") from None
            finally:
                self.sock.settimeout(None)
            if isinstance(msg, wire.Result):
                return msg, fds

    def exit_status(self, timeout: float = 5.0) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        self.sock.close()


def child_bootstrap(then: str = "from privileged.child import main; sys.exit(main())") -> str:
    """`python -c` text: load privileged/ from its checked directory, leave sys.path alone.

    Only what the interpreter has loaded already is used (_frozen_importlib and its
    PathFinder): nothing is imported before privileged itself."""
    top = os.path.dirname(os.path.dirname(os.path.realpath(privileged.__file__)))
    return ("import sys, _frozen_importlib as b, _frozen_importlib_external as e; "
            f"s = e.PathFinder.find_spec('privileged', [{top!r}]); "
            "m = sys.modules['privileged'] = b.module_from_spec(s); s.loader.exec_module(m); "
            + then)


def emit_child_log(msg: wire.Log, pid: int) -> None:
    """A LOG record becomes a log record with whitelisted fields only, and the
    child's pid: the line is the child's, whoever writes it out."""
    record = logging.makeLogRecord({
        "name": child_log.name,
        "process": pid,
        "levelno": msg.level,
        "levelname": logging.getLevelName(msg.level),
        "msg": "[child] %s",
        "args": (msg.text,),
    })
    if child_log.isEnabledFor(msg.level):
        child_log.handle(record)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
