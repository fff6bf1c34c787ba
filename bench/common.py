"""What every benchmark needs: statistics, a write-stall meter, the machine's description."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

WRITER = r"""
import os, sys, threading, time
sys.setswitchinterval(0.0005)
interval, paths = float(sys.argv[1]), sys.argv[2:]
slow = [[] for _ in paths]  # (start, end) of every write that took over 0.5 ms
def write(i, path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    block, n, mine = b"w" * 4096, 0, slow[i]
    while True:
        t = time.monotonic()
        os.pwrite(fd, block, (n % 64) * 4096)
        e = time.monotonic()
        if e - t > 0.0005:
            mine.append((t, e))
        n += 1
        time.sleep(interval)
for i, p in enumerate(paths):
    threading.Thread(target=write, args=(i, p), daemon=True).start()
for line in sys.stdin:
    t0, t1 = map(float, line.split())
    worst = 0.0
    for mine in slow:
        for s, e in list(mine):
            if s <= t1 and e >= t0:
                worst = max(worst, e - s)
        del mine[:]
    print(worst, flush=True)
"""
# Writer threads per process, and writes per second in all: a writer per filesystem each
# writing every millisecond would be 256,000 writes a second at 256 filesystems, more than
# two CPUs can issue; so the interval grows past 32 filesystems (5 ms at 256).  A write
# issued while its filesystem is frozen blocks until the thaw, so the longest blocked write
# is short of that filesystem's frozen time by at most one interval.
PER_PROCESS = 32
WRITES_PER_SECOND = 50_000


def write_interval(n: int) -> float:
    return max(0.001, n / WRITES_PER_SECOND)


class StallMeter:
    """One writer thread per filesystem (in processes of up to PER_PROCESS), each timing its
    own writes: stall(t0, t1) is the longest write that was blocked at some point of
    [t0, t1], measured by the writer itself."""

    def __init__(self, mountpoints: list[str]) -> None:
        paths = [os.path.join(m, "stall-writer.dat") for m in mountpoints]
        interval = str(write_interval(len(paths)))
        self.procs = [subprocess.Popen([sys.executable, "-I", "-c", WRITER, interval,
                                        *paths[i:i + PER_PROCESS]],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True)
                      for i in range(0, len(paths), PER_PROCESS)]
        time.sleep(0.2)

    def stall(self, t0: float, t1: float) -> float:
        time.sleep(0.05)  # let blocked writes complete and be recorded
        for p in self.procs:
            assert p.stdin
            p.stdin.write(f"{t0} {t1}\n")
            p.stdin.flush()
        worst = 0.0
        for p in self.procs:
            assert p.stdout
            worst = max(worst, float(p.stdout.readline()))
        return worst

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


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
            f"Python {platform.python_version()}")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def ratio(x: float, base: float) -> str:
    return f"{x / base:.2f}x" if base > 0 else "n/a"


def kib(size: int) -> str:
    return f"{size >> 10} KiB"
