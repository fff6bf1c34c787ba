"""`make bench`: hv-vss-agent's figures, each against a baseline measured in the same run.

  python -m bench [--quick] [--output BENCHMARKS.md]

1. control path: one CHECK round trip, simulator -> parent -> child -> back,
   against a bare socketpair ping-pong between two Python processes;
2. FREEZE latency and longest writer stall on 1, 8 and 32 scratch filesystems,
   clean and with 256 MiB of dirty data, pre-freeze syncfs on and off, against
   the same FIFREEZE sequence done in-process with no agent at all;
3. memory and start-up: RSS of parent and child, time from start to ready,
   against a bare `python -I -c pass`;
4. scale: FREEZE and THAW latency as mounts grow to 256, against bare ioctls.

Writes the table to the output file (with the machine and the command) and a
plot of latency against mount count to bench/out/scale.png.  Needs root.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from agent.dev import scratch
from bench import measure
from bench.common import kib, machine, ms, ratio

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--output", default="BENCHMARKS.md")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (it makes and freezes loop-device filesystems)", file=sys.stderr)
        return 1
    os.makedirs(OUT_DIR, exist_ok=True)
    started = time.monotonic()
    sections: list[str] = []
    with tempfile.TemporaryDirectory(prefix="hvvss-bench-", dir="/tmp") as work:
        os.chmod(work, 0o755)
        sections.append(_control(work, 200 if args.quick else 2000))
        sections.append(_freeze(work, [1, 8] if args.quick else [1, 8, 32],
                                64 if args.quick else 256, 2 if args.quick else 3))
        sections.append(_startup(work, 3 if args.quick else 10))
        sections.append(_scale(work, 16 if args.quick else 256, 3))
    took = time.monotonic() - started
    doc = _document(sections, args, took)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(doc)
    print(f"\nwritten: {args.output} and {OUT_DIR}/scale.png ({took:.0f} s)")
    return 0


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _control(work: str, n: int) -> str:
    print(f"\n## 1. Control path ({n} CHECKs)", flush=True)
    with scratch.filesystems(work, ["ext4"]) as fss:
        agent, with_frontend, bare = measure.control_path(work, fss[0].mountpoint, n)
    rows = []
    for label, run in (("", agent), (", with frontend", with_frontend)):
        rows += [[f"CHECK round trip{label}, p50", ms(run.p50), ms(bare.p50),
                  ratio(run.p50, bare.p50)],
                 [f"CHECK round trip{label}, p99", ms(run.p99), ms(bare.p99),
                  ratio(run.p99, bare.p99)]]
    return "## 1. Control path\n\nBaseline: a bare SOCK_SEQPACKET ping-pong between two " \
        "Python processes (12-byte messages). \"With frontend\": `[notify]` and `[control]` " \
        "configured, no subscriber, so each CHECK also crosses the engine-frontend link.\n\n" + \
        _table(["measure", "agent", "baseline", "ratio"], rows)


def _freeze(work: str, counts: list[int], dirty_mb: int, reps: int) -> str:
    print(f"\n## 2. FREEZE latency and write stall ({dirty_mb} MiB dirty, median of {reps})",
          flush=True)
    rows = []
    for n in counts:
        size = max(64, 2 * dirty_mb // n + 32)
        with scratch.filesystems(work, ["ext4"] * n, size_mb=size,
                                options=measure.QUIET) as fss:
            mounts = [fs.mountpoint for fs in fss]
            for dirty in (0, dirty_mb):
                for presync in (True, False):
                    lat, stall, blat, bstall = measure.freeze_and_stall(
                        work, mounts, dirty, presync, reps)
                    rows.append([str(n), f"{dirty} MiB", "on" if presync else "off",
                                 ms(lat), ms(blat), ratio(lat, blat),
                                 ms(stall), ms(bstall), ratio(stall, bstall)])
                    print("  " + " | ".join(rows[-1]), flush=True)
    return "## 2. FREEZE latency and write stall\n\nLatency: host FREEZE sent to reply. " \
        "Stall: the longest any concurrent writer (one per filesystem, a 4 KiB write every " \
        "millisecond) waited, the host sending THAW as soon as FREEZE is answered. Baseline: " \
        "the same syncfs/FIFREEZE/FITHAW sequence in-process, no agent, taking turns with " \
        "it.\n\n" + _table(
            ["filesystems", "dirty", "presync", "agent latency", "baseline", "ratio",
             "agent stall", "baseline", "ratio"], rows)


def _startup(work: str, reps: int) -> str:
    print(f"\n## 3. Memory and start-up (median of {reps})", flush=True)
    rows = []
    with scratch.filesystems(work, ["ext4"]) as fss:
        for frontend in (False, True):
            s, bt, brss = measure.startup(work, fss[0].mountpoint, reps, frontend)
            label = ", with frontend" if frontend else ""
            rows += [[f"start to ready{label}", f"{s.ready * 1e3:.0f} ms",
                      f"{bt * 1e3:.0f} ms", ratio(s.ready, bt)],
                     [f"parent RSS{label}", kib(s.parent_rss), kib(brss),
                      ratio(s.parent_rss, brss)],
                     [f"child RSS{label}", kib(s.child_rss), kib(brss),
                      ratio(s.child_rss, brss)]]
            if frontend:
                rows.append(["frontend RSS", kib(s.frontend_rss), kib(brss),
                             ratio(s.frontend_rss, brss)])
    return "## 3. Memory and start-up\n\nStart to ready: from exec to registered with the " \
        "kernel, the integrity check included. Baseline: `python -I -c pass` for the time, " \
        "and a bare `python -I` at rest for the RSS. The frontend is forked from the parent, " \
        "so much of its RSS is pages shared with it.\n\n" + \
        _table(["measure", "agent", "baseline", "ratio"], rows)


def _scale(work: str, most: int, reps: int) -> str:
    print(f"\n## 4. Scale (up to {most} filesystems, median of {reps})", flush=True)
    rows, points = [], []
    with measure.many_filesystems(work, most, 16) as fss:
        n = 1
        while n <= len(fss):
            p = measure.scale_point(work, [fs.mountpoint for fs in fss[:n]], reps)
            points.append(p)
            rows.append([str(n), ms(p.freeze), ms(p.bare_freeze), ratio(p.freeze, p.bare_freeze),
                         ms(p.thaw), ms(p.bare_thaw), ratio(p.thaw, p.bare_thaw),
                         ms(p.bare_freeze_expedited)])
            print("  " + " | ".join(rows[-1]), flush=True)
            n *= 2
    _plot(points)
    return "## 4. Scale\n\nClean ext4 filesystems (presync on). Baseline: the same ioctls " \
        "in-process, no agent, taking turns with it. Every FREEZE, the agent's and the " \
        f"baseline's, comes {measure.IDLE} s after the last THAW, as in real use: a " \
        "FIFREEZE takes the superblock's three percpu rw-semaphores for writing, and each " \
        "waits for an RCU grace period unless that superblock was thawed a few milliseconds " \
        "before. The last column is the baseline again with " \
        "`/sys/kernel/rcu_expedited` set to 1 for that FREEZE only (restored at once): " \
        "what the kernel's grace periods cost.\n\n" + _table(
            ["filesystems", "agent FREEZE", "baseline", "ratio", "agent THAW", "baseline",
             "ratio", "baseline FREEZE, expedited RCU"], rows) + \
        "\n\n![latency against mount count](bench/out/scale.png)"


def _plot(points: list[measure.ScalePoint]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no plot)", file=sys.stderr)
        return
    n = [p.mounts for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for series, label, style in (
            ([p.freeze for p in points], "agent FREEZE", "o-"),
            ([p.bare_freeze for p in points], "bare FIFREEZE", "o--"),
            ([p.bare_freeze_expedited for p in points], "bare FIFREEZE, expedited RCU", "^:"),
            ([p.thaw for p in points], "agent THAW", "s-"),
            ([p.bare_thaw for p in points], "bare FITHAW", "s--")):
        ax.plot(n, [x * 1e3 for x in series], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("filesystems frozen")
    ax.set_ylabel("latency (ms)")
    ax.set_title("FREEZE/THAW latency against mount count")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(os.path.join(OUT_DIR, "scale.png"), dpi=110)


def _document(sections: list[str], args: argparse.Namespace, took: float) -> str:
    cmd = "make bench" + (" (python -m bench --quick)" if args.quick else "")
    return (f"# Benchmarks\n\nProduced by `{cmd}` in {took:.0f} s on: {machine()}.\n\n"
            "Every figure is next to a baseline measured in the same run; the ratio is "
            "agent / baseline. The kernel side is the built-in simulator; the filesystems, "
            "freezes and processes are real. The agent runs the shipped default config "
            "(`etc/hv-vss-agent.toml`: no frontend) unless a row says \"with frontend\". "
            "Tests never assert on these numbers.\n\n"
            + "\n\n".join(sections) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
