"""Scratch ext4 filesystems for the benchmarks: on zram where the kernel has it, on loop
devices over sparse files otherwise, each one ours and nothing else.

Every device and mount is written to a ledger in /run/hv-vss-agent-bench (tmpfs: it lives
exactly as long as the devices do) before it is made, and struck off after it is gone. A
run that is killed leaves its ledger behind, and the next run tears down what it names,
once that run's process is gone, and only what still proves to be the one it made: a zram
device whose ext4 UUID is the one recorded, a loop device backed by the recorded image, a
mount of that device. Nothing is touched that a ledger does not name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

FITHAW = 0xC0045878
LEDGERS = "/run/hv-vss-agent-bench"
ZRAM_CONTROL = "/sys/class/zram-control"
MKFS = ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"]
# No background inode-table zeroing (ext4lazyinit): it writes to a new filesystem for
# minutes after mkfs, and a freeze waits for it, whoever asks.
MOUNT_OPTIONS = "noinit_itable"


@dataclass
class Scratch:
    kind: str  # "zram" or "loop"
    device: str
    mountpoint: str
    fs_uuid: str
    image: str = ""  # loop only


def _run(argv: list[str]) -> str:
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120)
    return out.stdout.strip()


def _start_time(pid: int) -> str:
    """A live process's start time (field 22 of /proc/pid/stat): pid and start time name
    it. "" if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return ""
    return "" if fields[0] in ("Z", "X") else fields[19]


def _thaw_all(mountpoint: str) -> None:
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        for _ in range(64):  # undo stacked freezes, if any
            fcntl.ioctl(fd, FITHAW, 0)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTTY):
            raise
    finally:
        os.close(fd)


def _mounted_from(mountpoint: str, device: str) -> bool:
    """Is `mountpoint` a mount of `device` (by device number, never by name)?"""
    try:
        return (os.path.ismount(mountpoint)
                and os.stat(mountpoint).st_dev == os.stat(device).st_rdev)
    except OSError:
        return False


def _unmount(mountpoint: str, device: str) -> None:
    while _mounted_from(mountpoint, device):
        _thaw_all(mountpoint)
        if subprocess.run(["umount", mountpoint], check=False, capture_output=True).returncode:
            time.sleep(0.2)  # busy: a writer of ours still exiting
            if subprocess.run(["umount", mountpoint], check=False,
                              capture_output=True).returncode:
                print(f"  bench: cannot unmount {mountpoint}", file=sys.stderr)
                return
    with contextlib.suppress(OSError):
        os.rmdir(mountpoint)


def _zram_uuid(device: str) -> str:
    r = subprocess.run(["blkid", "-p", "-s", "UUID", "-o", "value", device],
                       capture_output=True, text=True, check=False)
    return r.stdout.strip()


def _remove_zram(device: str) -> bool:
    n = device.removeprefix("/dev/zram")
    for _ in range(20):
        try:
            with open(os.path.join(ZRAM_CONTROL, "hot_remove"), "w", encoding="ascii") as f:
                f.write(n)
            return True
        except OSError as e:
            if e.errno != errno.EBUSY:
                break
            time.sleep(0.1)  # udev's probe of a new device holds it open for a moment
    print(f"  bench: cannot remove {device}", file=sys.stderr)
    return False


def _loop_devices_of(image: str) -> list[str]:
    r = subprocess.run(["losetup", "-n", "-O", "NAME", "-j", image], capture_output=True,
                       text=True, check=False)
    return r.stdout.split()


class Ledger:
    """What this run made, on disk until it is gone again."""

    def __init__(self) -> None:
        os.makedirs(LEDGERS, mode=0o700, exist_ok=True)
        self.path = os.path.join(LEDGERS, f"{os.getpid()}-{_start_time(os.getpid())}.jsonl")
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                          0o600)

    def note(self, **entry: str) -> None:
        os.write(self.fd, (json.dumps(entry) + "\n").encode())

    def close(self) -> None:
        os.close(self.fd)
        os.unlink(self.path)


def _replay(path: str) -> dict[str, dict[str, str]]:
    """The ledger's entries still standing, by device or image."""
    alive: dict[str, dict[str, str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line cut short by the crash
            key = e.get("device") or e.get("image", "")
            if e.get("gone"):
                alive.pop(key, None)
            else:
                alive.setdefault(key, {}).update(e)
    return alive


def clean_leftovers() -> None:
    """Tear down what earlier runs, now dead, left behind (and only that)."""
    if not os.path.isdir(LEDGERS):
        return
    for name in sorted(os.listdir(LEDGERS)):
        pid, _, start = name.removesuffix(".jsonl").partition("-")
        if not pid.isdigit() or (_start_time(int(pid)) == start and start):
            continue  # a run still going: not ours to touch
        path = os.path.join(LEDGERS, name)
        left = _replay(path)
        for e in left.values():
            print(f"  bench: cleaning up after run {pid}: {e}", file=sys.stderr)
            _teardown(e)
        os.unlink(path)


def _teardown(e: dict[str, str], *, certain: bool = False) -> None:
    """Undo one entry; `certain`: made by this very process, so ours whatever it holds."""
    device, mountpoint = e.get("device", ""), e.get("mountpoint", "")
    if e.get("kind") == "zram":
        if not device or not os.path.exists(device):
            return
        if not certain and _zram_uuid(device) != e.get("uuid"):
            # Never made into our filesystem (or not ours any more): leave it.
            print(f"  bench: {device} does not carry our filesystem: left alone",
                  file=sys.stderr)
            return
        if mountpoint:
            _unmount(mountpoint, device)
        _remove_zram(device)
    else:
        image = e.get("image", "")
        for dev in _loop_devices_of(image) if image else []:
            if mountpoint:
                _unmount(mountpoint, dev)
            subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)
        with contextlib.suppress(OSError):
            os.unlink(image)


def zram_available() -> bool:
    return os.path.exists(os.path.join(ZRAM_CONTROL, "hot_add"))


def _make_zram(ledger: Ledger, workdir: str, name: str, size_mb: int) -> Scratch:
    fs_uuid = str(uuid.uuid4())
    with open(os.path.join(ZRAM_CONTROL, "hot_add"), encoding="ascii") as f:
        device = f"/dev/zram{f.read().strip()}"
    mountpoint = os.path.join(workdir, name)
    ledger.note(kind="zram", device=device, uuid=fs_uuid, mountpoint=mountpoint)
    s = Scratch("zram", device, mountpoint, fs_uuid)
    try:
        for _ in range(50):  # the node appears when udev (or devtmpfs) makes it
            if os.path.exists(device):
                break
            time.sleep(0.02)
        with open(f"/sys/block/{os.path.basename(device)}/disksize", "w",
                  encoding="ascii") as f:
            f.write(f"{size_mb}M")
        _run([*MKFS, "-U", fs_uuid, device])
        os.makedirs(mountpoint, exist_ok=True)
        _run(["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, device, mountpoint])
    except BaseException:
        _destroy(ledger, s)
        raise
    return s


def _make_loop(ledger: Ledger, workdir: str, name: str, size_mb: int) -> Scratch:
    fs_uuid = str(uuid.uuid4())
    image = os.path.join(workdir, f"{name}.img")
    mountpoint = os.path.join(workdir, name)
    ledger.note(kind="loop", image=image, uuid=fs_uuid, mountpoint=mountpoint)
    s = Scratch("loop", "", mountpoint, fs_uuid, image)
    try:
        with open(image, "wb") as f:
            f.truncate(size_mb << 20)
        _run([*MKFS, "-U", fs_uuid, image])
        s.device = _run(["losetup", "--find", "--show", image])
        os.makedirs(mountpoint, exist_ok=True)
        _run(["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, s.device, mountpoint])
    except BaseException:
        _destroy(ledger, s)
        raise
    return s


def _destroy(ledger: Ledger, s: Scratch) -> None:
    entry = {"kind": s.kind, "device": s.device, "uuid": s.fs_uuid,
             "mountpoint": s.mountpoint, "image": s.image}
    _teardown(entry, certain=True)
    ledger.note(gone="1", **({"device": s.device} if s.kind == "zram" else {"image": s.image}))


def _raise_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(f"bench: stopped by signal {signum}; cleaning up")


@contextlib.contextmanager
def filesystems(workdir: str, n: int, size_mb: int) -> Iterator[list[Scratch]]:
    """n ext4 scratch filesystems (zram, or loop without it), torn down on the way out,
    SIGTERM and SIGHUP included (SIGKILL: by the next run, from the ledger)."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_on_signal)
    clean_leftovers()
    ledger = Ledger()
    made: list[Scratch] = []
    make = _make_zram if zram_available() else _make_loop
    try:
        for i in range(n):
            made.append(make(ledger, workdir, f"fs{i:03d}", size_mb))
            if (i + 1) % 64 == 0:
                print(f"  {i + 1}/{n} scratch filesystems", file=sys.stderr, flush=True)
        yield made
    finally:
        for s in reversed(made):
            _destroy(ledger, s)
        ledger.close()


def kind() -> str:
    return "zram" if zram_available() else "loop devices over sparse files"


def missing_tools() -> list[str]:
    return [t for t in ("mkfs.ext4", "mount", "umount", "blkid", "losetup")
            if shutil.which(t) is None]
