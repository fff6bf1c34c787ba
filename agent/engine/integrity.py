"""Before root starts anything: is what root will run and read safe from tampering?

OpenSSH's StrictModes, applied to the install: the code root runs (privileged/,
and agent/ which runs as root until the drop), the interpreter, its prefix,
its shared library and its standard library (bytecode caches included), a
virtualenv's pyvenv.cfg (its "home" says where that standard library is), the
site-packages directory and the third-party modules the parent imports there
once it is unprivileged (it still holds the kernel device then), every module
file root has imported by the time of the check, and the config file
must all be owned by root and writable by nobody else, and so must every
directory above them.  Otherwise the unprivileged account, or any other, could
make root run its code (the mistake behind CVE-2020-26880).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig

import agent
import privileged
from agent.errors import StartupError
from privileged.trust import directories_reason, untrusted_reason, untrusted_tree_reason

# What the parent imports from site-packages, once unprivileged (agent/engine/root.py).
THIRD_PARTY = ("multiprocessing_logging.py",)

# Never imported by either process; the child runs with -S, so the interpreter's
# own site-packages (which pyenv keeps inside the stdlib directory) is not on its
# path, and the parent's imports from there are covered module by module.
STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "idlelib", "tkinter",
                         "turtledemo", "ensurepip", "lib2to3"})


def paths_to_check() -> tuple[list[str], list[str]]:
    """(trees checked recursively, single paths checked with their parents)."""
    trees = [os.path.dirname(os.path.abspath(privileged.__file__)),
             os.path.dirname(os.path.abspath(agent.__file__)),
             sysconfig.get_paths()["stdlib"]]
    singles = [os.path.realpath(sys.executable), sys.executable,
               sys.prefix, sys.base_prefix, sys.exec_prefix]
    optional = [os.path.join(os.path.dirname(os.path.dirname(sys.executable)), "pyvenv.cfg")]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        optional.append(os.path.join(sysconfig.get_config_var("LIBDIR"),
                                     sysconfig.get_config_var("INSTSONAME")))
    singles += [p for p in optional if os.path.isfile(p)]
    for sp in site_packages():
        singles.append(sp)
        singles += [p for p in (os.path.join(sp, n) for n in THIRD_PARTY) if os.path.exists(p)]
    # Everything root has imported so far (third-party modules included).
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and os.path.exists(path):
            singles.append(os.path.abspath(path))
    return trees, singles


def site_packages() -> list[str]:
    """The site-packages directories the parent appends to sys.path once unprivileged.

    Its interpreter starts with -S, so site.py never runs (no .pth file is executed,
    ever) and a virtualenv is not recognised: it is found here, as site.py would,
    by the pyvenv.cfg beside the interpreter's directory."""
    venv = os.path.dirname(os.path.dirname(sys.executable))
    if os.path.isfile(os.path.join(venv, "pyvenv.cfg")):
        scheme, prefix = "venv", venv  # Debian's default scheme would say dist-packages
    else:
        scheme, prefix = sysconfig.get_default_scheme(), sys.prefix
    vars_ = {"base": prefix, "platbase": prefix}
    found = (sysconfig.get_path(k, scheme, vars_) for k in ("purelib", "platlib"))
    return [p for p in dict.fromkeys(found) if os.path.isdir(p)]


def child_sys_path() -> list[str]:
    """sys.path as the root child's interpreter (-I -S, nothing of ours) sets it up."""
    out = subprocess.run([sys.executable, "-I", "-B", "-S", "-c", "import sys; print(sys.path)"],
                         capture_output=True, text=True, env={}, cwd="/", timeout=30,
                         check=True).stdout
    return [str(p) for p in ast.literal_eval(out)]


def absent_reason(path: str) -> str | None:
    """A path that does not exist yet is safe only if nobody but root could create it:
    the nearest directory above it that exists, and all above that, must be safe."""
    missing = os.path.realpath(path)
    while not os.path.lexists(os.path.dirname(missing)):
        missing = os.path.dirname(missing)
    return directories_reason(missing)


def check_install(config_path: str | None) -> None:
    trees, singles = paths_to_check()
    if config_path:
        singles.append(config_path)
    for path in dict.fromkeys(singles):
        reason = untrusted_reason(path)
        if reason:
            raise StartupError(f"refusing to run as root: {reason}")
    # Everything the child can import: its sys.path (the standard library), and privileged/.
    entries = child_sys_path()
    for top in dict.fromkeys([*trees, *entries]):
        if not os.path.lexists(top):
            reason = absent_reason(top)
        elif os.path.isdir(top):
            reason = untrusted_tree_reason(top, STDLIB_SKIP)
        else:
            reason = untrusted_reason(top)
        if reason:
            raise StartupError(f"refusing to run as root: {reason}")
