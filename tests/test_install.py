"""`make install` into a DESTDIR: the layout a package needs, and what the agent will accept.

Only a staging directory is written: nothing is installed on this machine (the
container test, tests/test_systemd_container.py, installs for real inside its own
Debian).  The virtualenv is built for its final place, so no staging path may remain
in what it will execute.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO

PREFIX = "/opt/hv-vss-agent"


def _make(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["make", "-s", "--no-print-directory", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=600, check=False)
    assert not check or out.returncode == 0, out.stdout + out.stderr
    return out


def _top_level() -> set[str]:
    """What the clone holds at its top (where a build would leave build/ and egg-info)."""
    return set(os.listdir(REPO))


def test_install_into_a_destdir_with_another_prefix(workdir):
    dest = os.path.join(workdir, "dest")
    before = _top_level()
    _make("install", f"DESTDIR={dest}", f"PREFIX={PREFIX}")
    assert _top_level() == before  # built from a copy: no build/ or egg-info here

    venv = f"{dest}{PREFIX}/lib/hv-vss-agent"
    # The command starts the interpreter with -I -S: no .pth file ever runs as root.
    with open(f"{dest}{PREFIX}/bin/hv-vss-agent", encoding="utf-8") as f:
        command = f.read().splitlines()
    assert command[0] == "#!/bin/sh"
    assert command[-1] == (f'exec {PREFIX}/lib/hv-vss-agent/bin/python -I -S {venv[len(dest):]}'
                           f'/lib/python{sys.version_info.major}.{sys.version_info.minor}'
                           '/site-packages/agent/__main__.py "$@"')
    with open(f"{venv}/bin/hv-vss-agent", encoding="utf-8") as f:
        assert f.readline() == f"#!{PREFIX}/lib/hv-vss-agent/bin/python\n"
    for name in os.listdir(f"{venv}/bin"):
        path = f"{venv}/bin/{name}"
        if not os.path.islink(path):
            with open(path, "rb") as f:
                assert dest.encode() not in f.read(), path
    with open(f"{venv}/pyvenv.cfg", encoding="utf-8") as f:
        cfg = f.read()
    assert dest not in cfg and "home = /usr/bin" in cfg
    # Outside /usr and /usr/local, systemd finds units and its entries only under /etc.
    with open(f"{dest}/etc/systemd/system/hv-vss-agent.service", encoding="utf-8") as f:
        assert f"ExecStart={PREFIX}/bin/hv-vss-agent -n\n" in f.read()
    for path in ("etc/sysusers.d/hv-vss-agent.conf", "etc/tmpfiles.d/hv-vss-agent.conf",
                 "etc/hv-vss-agent.toml", f"{PREFIX.lstrip('/')}/share/man/man8/hv-vss-agent.8"):
        st = os.stat(os.path.join(dest, path))
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o644), path
    # Everything root's, nothing writable by group or others.
    for top, dirs, files in os.walk(dest):
        for name in dirs + files:
            st = os.lstat(os.path.join(top, name))
            assert st.st_uid == 0 and (os.path.islink(os.path.join(top, name))
                                       or st.st_mode & 0o022 == 0), os.path.join(top, name)

    # The agent's own check passes on it, and notices a file someone else could change.
    args = (f"DESTDIR={dest}", f"PREFIX={PREFIX}")
    assert "install check passed" in _make("check-install", *args).stdout
    child = next(os.path.join(t, "child.py") for t, _, fs in os.walk(venv)
                 if t.endswith("site-packages/privileged") and "child.py" in fs)
    os.chmod(child, 0o664)
    out = _make("check-install", *args, check=False)
    assert out.returncode != 0
    assert f"{child} is writable by group or others" in out.stdout + out.stderr

    # A second install keeps the operator's config.
    with open(f"{dest}/etc/hv-vss-agent.toml", "a", encoding="utf-8") as f:
        f.write("# the operator's\n")
    assert "keeping" in _make("install", *args).stdout
    with open(f"{dest}/etc/hv-vss-agent.toml", encoding="utf-8") as f:
        assert f.read().endswith("# the operator's\n")

    _make("uninstall", *args)
    assert not os.path.exists(venv) and os.path.exists(f"{dest}/etc/hv-vss-agent.toml")
