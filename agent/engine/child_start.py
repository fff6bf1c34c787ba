"""Starting the root child: the root phase's part of the link to it.

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
its end of the socketpair.

Root only starts it: its HELLO is read, and everything after, once root is gone
(agent/engine/child_link.py), so the wire's codecs never run as root.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import privileged


@dataclass(frozen=True)
class Started:
    sock: socket.socket  # the parent's end of the socketpair
    proc: subprocess.Popen[bytes]

    def end(self, timeout: float = 5.0) -> None:
        """Close our end: the child sees EOF, thaws what it holds and exits; wait a while."""
        self.sock.close()
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            self.proc.wait(timeout)


def start(config: str | None, device: str | None, debug: bool = False,
          extra: tuple[str, ...] = ()) -> Started:
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
    return Started(ours, proc)


def child_bootstrap(then: str = "from privileged.child import main; sys.exit(main())") -> str:
    """`python -c` text: load privileged/ from its checked directory, leave sys.path alone.

    Only what the interpreter has loaded already is used (_frozen_importlib and its
    PathFinder): nothing is imported before privileged itself."""
    top = os.path.dirname(os.path.dirname(os.path.realpath(privileged.__file__)))
    return ("import sys, _frozen_importlib as b, _frozen_importlib_external as e; "
            f"s = e.PathFinder.find_spec('privileged', [{top!r}]); "
            "m = sys.modules['privileged'] = b.module_from_spec(s); s.loader.exec_module(m); "
            + then)
