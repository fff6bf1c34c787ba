"""Soak: 10,000 CHECK/FREEZE/THAW cycles on real scratch filesystems.

Every reply must be exactly right, and every agent process must stay flat:
the same descriptors throughout and no memory growth beyond allocator noise
(psutil, sampled every 500 cycles after a warm-up).  Slow, but it runs in
`make test`.
"""

from __future__ import annotations

import sys

import psutil
import pytest

from tests.helpers import assert_writable, running_agent

CYCLES = 10_000
SAMPLE_EVERY = 500
WARM_UP = 1_000
RSS_SLACK = 4 << 20  # bytes of growth tolerated between warm-up and the end
OK_REPLY = bytes(12)


def agent_processes(parent: psutil.Process) -> list[psutil.Process]:
    return [parent, *parent.children()]


def sample(procs: list[psutil.Process]) -> dict[int, tuple[int, int]]:
    return {p.pid: (p.num_fds(), p.memory_info().rss) for p in procs}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_ten_thousand_cycles_stay_flat(workdir, ext4_xfs):
    mounts = [fs.mountpoint for fs in ext4_xfs]
    # frozen half of the time, far beyond the shipped budget's 10 %: let it refill as fast
    with running_agent(workdir, mounts, budget_per_hour=3600) as agent:
        procs = agent_processes(agent.parent)
        samples: list[dict[int, tuple[int, int]]] = []
        for i in range(1, CYCLES + 1):
            for op in ("check", "freeze", "thaw"):
                req = agent.sim.request(op, timeout=30)
                assert (req.status, req.daemon_reply) == (0, OK_REPLY), f"cycle {i} {op}: {req}"
            if i % SAMPLE_EVERY == 0:
                samples.append(sample(procs))
                sys.stderr.write(f"\r  soak: {i}/{CYCLES} cycles")
        sys.stderr.write("\n")
        for pid in samples[0]:
            sys.stderr.write(f"  pid {pid}: fds {[s[pid][0] for s in samples][::4]}, RSS KiB "
                             f"{[s[pid][1] >> 10 for s in samples][::4]}\n")
        after_warm_up = samples[WARM_UP // SAMPLE_EVERY - 1]
        for pid, (fds, rss) in samples[-1].items():
            assert all(s[pid][0] == fds for s in samples), f"pid {pid}: descriptors changed"
            assert rss - after_warm_up[pid][1] < RSS_SLACK, \
                f"pid {pid}: RSS grew {rss - after_warm_up[pid][1]} bytes after warm-up"
        assert agent.child.num_threads() == 1
        for m in mounts:
            assert_writable(m)
