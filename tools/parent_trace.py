"""What the parent runs as root, seen from outside: strace, not the code's word for it.

    python -m tools.parent_trace

Starts the real agent as root (the launcher by its path, as the unit does) with
every root-side feature configured (frontend sockets, metrics directory) against
a simulator, under `strace -f`, lets it register, stops it, and reads the trace
of the parent process up to its first setresuid(): the module files it opened
(our code lines are counted as tools/root_loc.py counts them), any third-party
file, any .pth file, and any thread it started.  Needs root, strace and the
unprivileged account (make test installs them).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LINE = re.compile(r"^(\d+)\s+(\w+)\((.*)$")
_OPENED = re.compile(r'^[^"]*"([^"]+)"')


@dataclass
class ParentAsRoot:
    modules: dict[str, int] = field(default_factory=dict)  # our files -> code lines
    third_party: list[str] = field(default_factory=list)
    pth: list[str] = field(default_factory=list)
    threads: int = 0
    dropped: bool = False

    @property
    def lines(self) -> int:
        return sum(self.modules.values())


def source_of(path: str) -> str:
    """agent/__pycache__/cli.cpython-311.pyc -> agent/cli.py"""
    if "__pycache__" in path and path.endswith(".pyc"):
        folder, name = os.path.split(path)
        return os.path.join(os.path.dirname(folder), name.split(".")[0] + ".py")
    return path


def read_trace(text: str, top: str, site: list[str]) -> ParentAsRoot:
    from tools.root_loc import code_lines

    report, parent = ParentAsRoot(), None
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        pid, call, rest = int(m.group(1)), m.group(2), m.group(3)
        parent = pid if parent is None else parent
        if call == "openat" and (opened := _OPENED.match(rest)) and " = -1 " not in rest:
            path = source_of(opened.group(1))
            if path.endswith(".pth"):
                report.pth.append(path)
        if pid != parent:
            continue
        if call == "setresuid":
            report.dropped = True
            break
        if call in ("clone", "clone3") and "CLONE_THREAD" in rest:
            report.threads += 1
        if call == "openat" and opened and " = -1 " not in rest:
            if any(path.startswith(sp + os.sep) for sp in site):
                report.third_party.append(path)
            elif path.startswith(top + os.sep) and path.endswith(".py"):
                rel = os.path.relpath(path, top)
                if rel.split(os.sep)[0] in ("agent", "privileged"):
                    report.modules[rel] = code_lines(path)
    return report


def stop_traced(tracer: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM the agent strace runs (a signal to strace would only detach it), and wait
    for the agent and its processes to end: none may outlive the trace."""
    import psutil

    if tracer is None:
        return
    with contextlib.suppress(psutil.Error):
        agents = psutil.Process(tracer.pid).children()
        family = [p for a in agents for p in a.children(recursive=True)] + agents
        for a in agents:
            a.terminate()
        _, alive = psutil.wait_procs(family, timeout=15)
        for p in alive:
            p.kill()
    tracer.wait(15)


def trace(top: str = TOP, launch: tuple[str, ...] | None = None) -> ParentAsRoot:
    """`launch` in place of the launcher (to see what another way of starting does)."""
    sys.path.insert(0, top)
    from agent.engine.integrity import site_packages
    from tests.helpers import LAUNCH, PY, Agent

    work = tempfile.mkdtemp(prefix="hvvss-trace-")
    out = os.path.join(work, "strace.out")
    try:
        os.chmod(work, 0o755)  # noqa: S103  (the unprivileged account must reach the config's dirs)
        metrics = os.path.join(work, "metrics")
        os.mkdir(metrics, 0o755)
        os.chown(metrics, pwd.getpwnam("hvvss").pw_uid, -1)
        agent = Agent(work, [os.path.join(work, "nothing")], metrics={"dir": metrics})
        agent.argv_prefix = ["strace", "-f", "-qq", "-o", out, "-e",
                             "trace=openat,setresuid,clone,clone3", *(launch or (PY, *LAUNCH))]
        try:
            agent.start()
        finally:
            stop_traced(agent.proc)
            agent.stop()
        with open(out, encoding="utf-8", errors="replace") as f:
            return read_trace(f.read(), top, site_packages())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    if os.geteuid() != 0 or shutil.which("strace") is None:
        sys.stderr.write("tools.parent_trace: needs root and strace (make test installs it)\n")
        return 2
    report = trace()
    print(f"parent as root (strace, up to its setresuid): {report.lines} code lines in "
          f"{len(report.modules)} files; third-party files {len(report.third_party)}, "
          f".pth files {len(report.pth)}, threads {report.threads}")
    for path, n in sorted(report.modules.items()):
        print(f"  {n:5}  {path}")
    for path in report.third_party + report.pth:
        print(f"  !  {path}")
    return 0 if report.dropped else 1


if __name__ == "__main__":
    raise SystemExit(main())
