"""What every benchmark needs: statistics, a write-stall meter, the machine's description."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

WRITER = r"""
import json, os, sys, threading, time
paths = sys.argv[1:]
done = [[] for _ in paths]
def write(i, path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    block, n = b"w" * 4096, 0
    while True:
        os.pwrite(fd, block, (n % 64) * 4096)
        n += 1
        done[i].append(time.monotonic())
        time.sleep(0.001)
for i, p in enumerate(paths):
    threading.Thread(target=write, args=(i, p), daemon=True).start()
for line in sys.stdin:
    t0, t1 = map(float, line.split())
    worst = 0.0
    for times in done:
        snap = list(times)
        for a, b in zip(snap, snap[1:]):
            if b >= t0 and a <= t1:
                worst = max(worst, b - a)
        del times[:-1]
    print(json.dumps(worst), flush=True)
"""


class StallMeter:
    """One process, one writer thread per filesystem, each writing every millisecond.

    stall(t0, t1) is the longest any writer waited between two completed writes
    in the window [t0, t1]: how long a freeze held an application up."""

    def __init__(self, mountpoints: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", WRITER,
             *[os.path.join(m, "stall-writer.dat") for m in mountpoints]],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        time.sleep(0.1)

    def stall(self, t0: float, t1: float) -> float:
        assert self.proc.stdin and self.proc.stdout
        time.sleep(0.05)  # let blocked writes complete and be recorded
        self.proc.stdin.write(f"{t0} {t1}\n")
        self.proc.stdin.flush()
        return float(json.loads(self.proc.stdout.readline()))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@dataclass
class Stats:
    p50: float
    p99: float
    n: int


def stats(samples: list[float]) -> Stats:
    s = sorted(samples)
    return Stats(statistics.median(s), s[min(len(s) - 1, int(len(s) * 0.99))], len(s))


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 30
    return (f"{platform.system()} {platform.release()}, {os.cpu_count()} x {cpu}, {mem} GiB RAM, "
            f"Python {platform.python_version()}; scratch filesystems on loop devices over "
            f"sparse image files in {TMPDIR} ({_fs_of(TMPDIR)})")


TMPDIR = "/tmp"


def _fs_of(path: str) -> str:
    try:
        out = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", path],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def ratio(x: float, base: float) -> str:
    return f"{x / base:.2f}x" if base > 0 else "n/a"


def kib(size: int) -> str:
    return f"{size >> 10} KiB"
