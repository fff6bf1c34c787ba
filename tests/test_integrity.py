"""A tampered install is refused before root runs anything (agent/engine/integrity.py).

Each case runs the real command line from a copy of the code (or through a
virtualenv) that the test made unsafe in one place, and expects exit 1 with
one line naming that place.  Nothing is started: the check comes first.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys

import pytest

from tests.helpers import PY, REPO, write_config
from tests.test_cli import one_line_error

SITE_PACKAGES = site.getsitepackages()[0]  # psutil and friends, root-owned


@pytest.fixture
def install(workdir):
    """A root-owned copy of agent/ and privileged/, as a package manager would install it."""
    top = os.path.join(workdir, "install")
    for pkg in ("agent", "privileged"):
        shutil.copytree(os.path.join(REPO, pkg), os.path.join(top, pkg),
                        ignore=shutil.ignore_patterns("__pycache__"))
    for dirpath, _, filenames in os.walk(top):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    return top


def config_file(workdir: str) -> str:
    """A valid config whose account does not exist: start-up stops right after the check."""
    path = write_config(os.path.join(workdir, "a.toml"), [], workdir)
    with open(path, encoding="utf-8") as f:
        text = f.read().replace('user = "hvvss"', 'user = "no-such-account"')
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


PASSED = "account 'no-such-account' ([agent] user) does not exist"


def run_from(python: str, install: str, config: str) -> subprocess.CompletedProcess[str]:
    """The daemon as the installed command starts it: -I -S, the launcher by its path."""
    return subprocess.run([python, "-I", "-S", "-B", os.path.join(install, "agent", "__main__.py"),
                           "-n", "--config", config, "--device", "/nonexistent"],
                          capture_output=True, text=True, timeout=60, cwd="/", check=False)


def test_an_untouched_install_passes_the_check(workdir, install):
    one_line_error(run_from(PY, install, config_file(workdir)), 1, PASSED)


@pytest.mark.parametrize(("target", "mode", "says"), [
    ("privileged/wire.py", 0o664, "{p} is writable by group or others (mode 0664)"),
    ("privileged/child.py", 0o646, "{p} is writable by group or others (mode 0646)"),
    ("privileged", 0o775, "directory {p} is writable by group or others (mode 0775)"),
    ("agent/engine/daemon.py", 0o666, "{p} is writable by group or others (mode 0666)"),
    ("", 0o777, "directory {p} is writable by group or others (mode 0777)"),
    # below the packages, where nothing is imported yet when the check runs: found by
    # walking the whole tree, not by looking at what was imported
    ("agent/dev/demo.py", 0o664, "{p} is writable by group or others (mode 0664)"),
    ("agent/frontend", 0o775, "{p} is writable by group or others (mode 0775)"),
])
def test_a_writable_package_file_or_directory_is_refused(workdir, install, target, mode, says):
    path = os.path.join(install, target).rstrip("/")
    os.chmod(path, mode)
    config = config_file(workdir)
    one_line_error(run_from(PY, install, config), 1,
                   "refusing to run as root: " + says.format(p=path))


def test_a_package_file_owned_by_the_service_account_is_refused(workdir, install):
    path = os.path.join(install, "privileged", "freeze_linux.py")
    os.chown(path, 999, 999)
    config = config_file(workdir)
    one_line_error(run_from(PY, install, config), 1, f"{path} is owned by uid 999, not root")


@pytest.fixture
def venv(workdir):
    """A virtualenv of this interpreter: its prefix and pyvenv.cfg are what root runs."""
    path = os.path.join(workdir, "venv")
    subprocess.run([PY, "-m", "venv", "--without-pip", path], check=True, timeout=120)
    return path


@pytest.mark.parametrize("case", [
    ("", 0o775, "directory {p} is writable by group or others (mode 0775)"),
    ("bin", 0o777, "directory {p} is writable by group or others (mode 0777)"),
    ("pyvenv.cfg", 0o666, "{p} is writable by group or others (mode 0666)"),
], ids=["prefix", "bin", "pyvenv.cfg"])
def test_a_writable_interpreter_prefix_is_refused(workdir, install, venv, case):
    target, mode, says = case
    config = config_file(workdir)
    python = os.path.join(venv, "bin", "python")
    one_line_error(run_from(python, install, config), 1, PASSED)  # safe as made
    path = os.path.join(venv, target).rstrip("/")
    os.chmod(path, mode)
    one_line_error(run_from(python, install, config), 1,
                   "refusing to run as root: " + says.format(p=path))


def test_a_third_party_module_the_parent_imports_unprivileged_is_checked(workdir, install,
                                                                          venv):
    """The parent imports multiprocessing-logging from site-packages once it is hvvss, still
    holding the kernel device: a copy there that is not root's is refused as root starts."""
    python = os.path.join(venv, "bin", "python")
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    path = os.path.join(venv, "lib", version, "site-packages", "multiprocessing_logging.py")
    shutil.copy(os.path.join(SITE_PACKAGES, "multiprocessing_logging.py"), path)
    config = config_file(workdir)
    one_line_error(run_from(python, install, config), 1, PASSED)
    os.chown(path, 999, 999)
    one_line_error(run_from(python, install, config), 1, f"{path} is owned by uid 999, not root")


def test_a_writable_config_is_refused(workdir, install):
    config = config_file(workdir)
    os.chmod(config, 0o620)
    one_line_error(run_from(PY, install, config), 1,
                   f"refusing config file {config}: {config} is writable by group or others")
