"""A minimal Debian booted with systemd as its PID 1, in a systemd-nspawn container.

The tree is made once by debootstrap from the Debian mirror and cached outside the
repository (HVVSS_CONTAINER_CACHE, default /var/cache/hv-vss-agent-test); each run
boots a throw-away overlay of it, so nothing a run installs survives it.  Nothing is
installed on the host: the agent, its unit and its config exist only in the overlay.

The container shares the host's network (pip reaches PyPI as the host does) and, if
the host names one in PIP_CERT or SSL_CERT_FILE, its CA bundle.  Its cgroup tree is
the pure unified one (SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1): on a host that mounts the
v1 controllers, the container would otherwise get them read-only, and systemd could
not apply DevicePolicy= there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil

SUITE = os.environ.get("HVVSS_DEBIAN_SUITE", "bookworm")
MIRROR = os.environ.get("HVVSS_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CACHE = os.environ.get("HVVSS_CONTAINER_CACHE", "/var/cache/hv-vss-agent-test")
# What a small Debian server has, plus what the README's Linux steps install.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "make",
            "ca-certificates")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container",
         "nsenter": "util-linux"}


class ContainerError(Exception):
    pass


def missing_tools() -> list[str]:
    return sorted({pkg for tool, pkg in TOOLS.items() if not shutil.which(tool)})


def say(text: str) -> None:
    print(f"[container] {text}", file=sys.stderr, flush=True)


def base_tree() -> str:
    """The cached debootstrap tree, made under a lock if it is not there yet."""
    key = hashlib.sha256(f"{SUITE} {MIRROR} {' '.join(PACKAGES)}".encode()).hexdigest()[:12]
    tree = os.path.join(CACHE, f"{SUITE}-{key}")
    os.makedirs(CACHE, mode=0o700, exist_ok=True)
    with open(os.path.join(CACHE, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(tree):
            return tree
        partial = tree + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        log = os.path.join(CACHE, "debootstrap.log")
        say(f"debootstrap {SUITE} from {MIRROR} into {tree} (once; about 2 minutes; log: {log})")
        started = time.monotonic()
        with open(log, "w") as out:
            rc = subprocess.run(["debootstrap", "--variant=minbase",
                                 "--include=" + ",".join(PACKAGES), SUITE, partial, MIRROR],
                                stdout=out, stderr=subprocess.STDOUT, timeout=1200,
                                check=False).returncode
        if rc != 0:
            with open(log) as f:
                tail = f.read().splitlines()[-5:]
            raise ContainerError(f"debootstrap failed ({rc}): " + " | ".join(tail))
        os.rename(partial, tree)
        say(f"tree ready in {time.monotonic() - started:.0f} s")
        return tree


def _ca_bundle() -> str | None:
    for var in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        path = os.environ.get(var)
        if path and os.path.isfile(path):
            return path
    return None


class Container:
    """An overlay of the base tree, booted; `run` executes inside, as root."""

    def __init__(self, workdir: str, base: str, binds: dict[str, str]) -> None:
        self.workdir = workdir
        self.base = base
        self.binds = binds  # host path -> path in the container
        self.root = os.path.join(workdir, "root")
        self.log_path = os.path.join(workdir, "nspawn.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0  # the container's PID 1, as the host sees it
        self.ca = _ca_bundle()
        self.env = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8"}
        if self.ca:
            self.env["PIP_CERT"] = "/run/host-ca.crt"

    def path(self, inside: str) -> str:
        """A path in the container, as the host reaches it."""
        return os.path.join(self.root, inside.lstrip("/"))

    def mount(self) -> None:
        for d in ("upper", "work", "root"):
            os.makedirs(os.path.join(self.workdir, d), mode=0o755)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.base},upperdir={self.workdir}/upper,"
                        f"workdir={self.workdir}/work", self.root], check=True)

    def boot(self, timeout: float = 120) -> None:
        argv = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--boot",
                "-D", self.root, "--machine", "hvvss-test",
                # bpf(2): nspawn's own filter refuses it, and without it the container's
                # systemd cannot attach DevicePolicy='s and IPAddressDeny='s programs.
                # Landlock: refused too, and the root child restricts itself with it.
                "--system-call-filter=bpf landlock_create_ruleset landlock_add_rule "
                "landlock_restrict_self"]
        argv += [f"--bind={host}:{inside}" for host, inside in self.binds.items()]
        if self.ca:
            argv.append(f"--bind-ro={self.ca}:/run/host-ca.crt")
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.proc.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited {self.proc.returncode}: "
                                     f"{self.log()[-2000:]}")
            if time.monotonic() > deadline:
                raise ContainerError(f"no systemd in the container: {self.log()[-2000:]}")
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                if ns_pid(p.pid) == 1:
                    self.leader = p.pid
            time.sleep(0.1)
        state = "offline"  # until systemd, not nspawn, is PID 1 and answers on its socket
        while state in ("offline", "unknown", "") and time.monotonic() < deadline:
            state = self.run("systemctl is-system-running --wait", check=False,
                             timeout=deadline - time.monotonic()).stdout.strip()
            time.sleep(0.2)
        if state not in ("running", "degraded"):
            raise ContainerError(f"the container's systemd is {state!r}: {self.log()[-2000:]}")

    def run(self, command: str, *, check: bool = True, timeout: float = 600
            ) -> subprocess.CompletedProcess[str]:
        """`command` (sh) inside every namespace of the container, as its root."""
        out = subprocess.run(["nsenter", "--target", str(self.leader), "--all", "--",
                              "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in self.env.items()),
                              "/bin/sh", "-c", command],
                             capture_output=True, text=True, timeout=max(timeout, 1),
                             check=False)
        if check and out.returncode != 0:
            raise ContainerError(f"{command!r} exited {out.returncode}:\n{out.stdout}{out.stderr}")
        return out

    def host_pid(self, pid: int) -> int:
        """The host's pid of the container's process `pid`."""
        pidns = os.readlink(f"/proc/{self.leader}/ns/pid")
        for p in psutil.pids():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{p}/ns/pid") == pidns and ns_pid(p) == pid:
                    return p
        raise ContainerError(f"no process {pid} in the container")

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # nspawn asks the container's systemd to power off
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.ismount(self.root):
            rc = subprocess.run(["umount", self.root], check=False,
                                capture_output=True).returncode
            if rc != 0:
                subprocess.run(["umount", "-l", self.root], check=False, capture_output=True)


def ns_pid(pid: int) -> int:
    """The pid in its own (innermost) namespace."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    return pid


@contextlib.contextmanager
def booted(workdir: str, binds: dict[str, str]) -> Iterator[Container]:
    container = Container(os.path.join(workdir, "container"), base_tree(), binds)
    os.makedirs(container.workdir, mode=0o755)
    try:
        container.mount()
        yield container
    finally:
        container.stop()
