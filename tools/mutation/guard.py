"""The freeze guard every copy of the tree gets, after its mutant is written.

A mutant may select the wrong filesystems (ignore `[freeze] only`, flip a
veto, turn FITHAW's number into FIFREEZE's); freezing / or a filesystem
another process made would hang this machine, and thawing one would break
whoever froze it (another run's tests).  So each copy's `privileged` and
`agent` packages import a module, written by us after mutating and not
itself mutated, that wraps fcntl.ioctl in that process: FIFREEZE and FITHAW
(0xC0045877, 0xC0045878, spelled here, not taken from the mutated code) pass
only when the descriptor's mount (its mnt_id in /proc/self/fdinfo, looked up
in /proc/self/mountinfo) is

  - on a loop or zram block device (major 7, or zram's major in /proc/devices),
  - not the root filesystem's device, and
  - mounted at or below the directory the run's tests make their scratch
    filesystems in (their TMPDIR, one per worker).

Anything else, or anything the guard cannot establish, is EPERM and a line in
the guard's log.  It reads mountinfo with its own few lines, not with
privileged/mounts_linux.py: that parser is among what is mutated.

Every process that can freeze imports `privileged` first: the root child
(`python -I -B -S`, empty environment, so nothing from the environment would
reach it; the guard is in its code), the daemon, and the pytest process.
The guard uses only calls the child's seccomp filter allows (openat, read,
close, newfstatat).
"""

from __future__ import annotations

import os

MODULE = "_mutation_guard"
FIFREEZE = 0xC0045877

_SOURCE = '''\
"""Freeze guard for a mutation run (tools/mutation/guard.py): not part of the product."""
import errno as _errno
import fcntl as _fcntl
import os as _os

ALLOWED = {allowed!r}
LOG = {log!r}
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
NAMES = {{FIFREEZE: "FIFREEZE", FITHAW: "FITHAW"}}
LOOP_MAJOR = 7


def _read(path):
    fd = _os.open(path, _os.O_RDONLY | _os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            b = _os.read(fd, 65536)
            if not b:
                return b"".join(chunks).decode("utf-8", "surrogateescape")
            chunks.append(b)
    finally:
        _os.close(fd)


def _unescape(field):
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _block_majors():
    majors = {{LOOP_MAJOR}}
    block = _read("/proc/devices").split("Block devices:", 1)[-1]
    for line in block.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] == "zram":
            majors.add(int(parts[0]))
    return majors


def refusal(fd):
    """None if FIFREEZE on `fd` is allowed, else why not."""
    try:
        mnt_id = None
        for line in _read("/proc/self/fdinfo/%d" % fd).splitlines():
            if line.startswith("mnt_id:"):
                mnt_id = line.split()[1]
        if mnt_id is None:
            return "no mnt_id for descriptor %d" % fd
        for line in _read("/proc/self/mountinfo").splitlines():
            fields = line.split(" ")
            if fields[0] != mnt_id:
                continue
            dev, mountpoint = fields[2], _unescape(fields[4])
            after = fields[fields.index("-") + 1:]
            source = _unescape(after[1]) if len(after) > 1 else ""
            root = _os.stat("/").st_dev
            if dev == "%d:%d" % (_os.major(root), _os.minor(root)):
                return "%s is on the root filesystem's device" % mountpoint
            if not (mountpoint == ALLOWED or mountpoint.startswith(ALLOWED + "/")):
                return "%s is outside %s" % (mountpoint, ALLOWED)
            if not (source.startswith("/dev/loop") or source.startswith("/dev/zram")):
                return "%s is on %s, not a loop or zram device" % (mountpoint, source)
            rdev = _os.stat(source).st_rdev
            if _os.major(rdev) not in _block_majors():
                return "%s: %s is not a loop or zram device" % (mountpoint, source)
            return None
        return "mount %s of descriptor %d not in mountinfo" % (mnt_id, fd)
    except Exception as e:  # noqa: BLE001 - whatever it is, refuse
        return "cannot check descriptor %d: %r" % (fd, e)


def _note(text):
    try:
        fd = _os.open(LOG, _os.O_WRONLY | _os.O_APPEND | _os.O_CREAT | _os.O_CLOEXEC, 0o600)
        try:
            _os.write(fd, ("%d %s\\n" % (_os.getpid(), text)).encode())
        finally:
            _os.close(fd)
    except OSError:
        pass


def _install():
    if getattr(_fcntl, "_mutation_guarded", False):
        return
    real = _fcntl.ioctl

    def ioctl(fd, request, *args):
        name = NAMES.get(request & 0xFFFFFFFF)
        if name is not None:
            number = fd if isinstance(fd, int) else fd.fileno()
            why = refusal(number)
            if why is not None:
                _note("refused %s: %s" % (name, why))
                raise OSError(_errno.EPERM, "mutation guard refused %s: %s" % (name, why))
        return real(fd, request, *args)

    _fcntl.ioctl = ioctl
    _fcntl._mutation_guarded = True


_install()
'''

IMPORT_LINE = f"import privileged.{MODULE}  # freeze guard of the mutation run\n"
PACKAGES = ("privileged", "agent")


def source(allowed: str, log: str) -> str:
    return _SOURCE.format(allowed=os.path.abspath(allowed).rstrip("/"), log=log)


def with_import(init_source: bytes, line: str = IMPORT_LINE) -> bytes:
    """A package's __init__.py with `line` (the guard's import) before anything of its own
    runs (after a docstring and `from __future__` imports, which must stay first)."""
    import ast

    tree = ast.parse(init_source)
    after = 0
    for i, stmt in enumerate(tree.body):
        is_doc = (i == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
                  and isinstance(stmt.value.value, str))
        if is_doc or (isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__"):
            after = stmt.end_lineno or 0
            continue
        break
    lines = init_source.decode().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return "".join([*lines[:after], line, *lines[after:]]).encode()


def install(tree: str, allowed: str, log: str, packages: tuple[str, ...] = PACKAGES) -> None:
    """Write the guard into the copy at `tree` and import it from each package."""
    with open(os.path.join(tree, "privileged", MODULE + ".py"), "w", encoding="utf-8") as f:
        f.write(source(allowed, log))
    for package in packages:
        init = os.path.join(tree, package, "__init__.py")
        with open(init, "rb") as f:
            text = f.read()
        if IMPORT_LINE.encode() not in text:
            with open(init, "wb") as f:
                f.write(with_import(text))
