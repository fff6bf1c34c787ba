"""`make bench`: hv-vss-agent's figures, each against a baseline measured in the same run.

  python -m bench [--quick] [--output BENCHMARKS.md]

1. control path: one CHECK round trip, simulator -> parent -> child -> back,
   against a daemon that answers at once and does nothing, on the same simulator;
2. many filesystems: FREEZE, THAW and the longest blocked write of a writer per
   filesystem, on 1, 8, 32, 128 and 256 scratch ext4 filesystems (zram), clean
   and with 256 MiB of dirty data, the agent with its shipped config (and with
   the `[freeze] rcu_expedited` opt-in) against FIFREEZE one filesystem after
   another in-process, as the peer daemons do;
3. memory and start-up: RSS of parent and child, time from start to ready,
   against a bare `python -I -c pass`;
4. where the time of a FREEZE of one filesystem goes: the child's system calls
   under `perf trace`, its FIFREEZE against the baseline's.

Writes the tables to the output file (with the machine and the command) and a
plot of latency against filesystem count to bench/out/scale.png.  Needs root.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from bench import devices, measure
from bench.common import kib, machine, ms, ratio

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
SAMPLES = 48  # section 2: at least this many FIFREEZEs of single filesystems per mean


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--output", default="BENCHMARKS.md")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (it makes and freezes loop-device filesystems)", file=sys.stderr)
        return 1
    missing = devices.missing_tools()
    if missing:
        print(f"bench: missing {', '.join(missing)}", file=sys.stderr)
        return 1
    os.makedirs(OUT_DIR, exist_ok=True)
    started = time.monotonic()
    sections: list[str] = []
    with tempfile.TemporaryDirectory(prefix="hvvss-bench-", dir="/tmp") as work:
        os.chmod(work, 0o755)
        sections.append(_control(work, 200 if args.quick else 2000))
        sections.append(_many(work, [1, 8] if args.quick else [1, 8, 32, 128, 256],
                              64 if args.quick else 256, 2 if args.quick else 3))
        sections.append(_startup(work, 3 if args.quick else 10))
        sections.append(_one_freeze(work, 5 if args.quick else 15))
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
    with devices.filesystems(work, 1, 64) as fss:
        agent, with_frontend, floor = measure.control_path(work, fss[0].mountpoint, n)
    rows = []
    for label, run in (("", agent), (", with frontend", with_frontend)):
        rows += [[f"CHECK round trip{label}, p50", ms(run.p50), ms(floor.p50),
                  ratio(run.p50, floor.p50)],
                 [f"CHECK round trip{label}, p99", ms(run.p99), ms(floor.p99),
                  ratio(run.p99, floor.p99)]]
    return "## 1. Control path\n\nHost request sent to reply received, as the simulator sees " \
        "it. Baseline: a daemon that answers every request at once and does nothing else, " \
        "through the agent's own kernel channel on the same simulator: what the simulator " \
        "costs (its read and write are each a round trip to the simulator's thread, where " \
        "the real device's are one system call). \"With frontend\": `[notify]` and " \
        "`[control]` configured, no subscriber, so no event crosses to the frontend; only the " \
        "status does, once the host has been quiet for 5 ms.\n\n" + \
        _table(["measure", "agent", "baseline", "ratio"], rows)


def _many(work: str, counts: list[int], dirty_mb: int, reps: int) -> str:
    print(f"\n## 2. Many filesystems ({dirty_mb} MiB dirty or none, mean of {reps} or "
          f"more)", flush=True)
    rows: list[list[str]] = []
    points: list[tuple[int, dict[str, measure.Run]]] = []
    for n in counts:
        with devices.filesystems(work, n, max(64, 2 * dirty_mb // n + 32)) as fss:
            mounts = [fs.mountpoint for fs in fss]
            for dirty in (0, dirty_mb):
                runs = measure.freeze_many(work, mounts, dirty, repeats(reps, n))
                if not dirty:
                    points.append((n, runs))
                base = runs[measure.BASELINE]
                for way, r in runs.items():
                    rows.append([str(n), f"{dirty} MiB", way,
                                 ms(r.freeze), ratio(r.freeze, base.freeze),
                                 ms(r.thaw), ratio(r.thaw, base.thaw),
                                 ms(r.stall), ratio(r.stall, base.stall)])
                    print("  " + " | ".join(rows[-1]), flush=True)
    _plot(points)
    optin = "" if measure.optin_supported() else (
        " The child of this version has no `[freeze] rcu_expedited` opt-in: no row for it.")
    return "## 2. Many filesystems\n\n" \
        f"Scratch ext4 filesystems on {devices.kind()}, mounted `{devices.MOUNT_OPTIONS}`. " \
        f"Each figure is a mean, of {repeats(reps, counts[0])} repetitions at " \
        f"{counts[0]} filesystem and of {repeats(reps, counts[-1])} at {counts[-1]} " \
        "(fewer filesystems, more repetitions): a FIFREEZE returns just after a scheduler " \
        "tick, its RCU grace periods ending on one, so its time depends on where in the " \
        "tick it starts, and some take a few ticks more: a median of a few lands on one " \
        "time or another at random. " \
        "FREEZE and THAW: host request sent to reply, as the simulator sees it. Longest " \
        "blocked write: one writer per filesystem writes 4 KiB and times each of its own " \
        f"writes (every {measure_interval(counts)}); the longest write that was blocked " \
        "at some point between FREEZE sent and THAW answered, the host sending THAW as " \
        "soon as FREEZE is answered. " \
        f"\"{measure.BASELINE}\" is the baseline of every ratio: in the same run, taking " \
        "turns with the agent, the benchmark opens and FIFREEZEs each filesystem one after " \
        "another (then FITHAWs them in reverse), as hv_vss_daemon and qemu-ga do, with no " \
        f"flush first. \"{measure.AGENT}\" is the agent with the shipped " \
        "`etc/hv-vss-agent.toml` (but `[freeze] only`, `[state] dir` and the chroot, set " \
        "to the benchmark's own); " \
        f"\"{measure.OPT_IN}\" the same with `[freeze] rcu_expedited = true`; " \
        f"\"{measure.EXPEDITED}\" the baseline with `/sys/kernel/rcu_expedited` set to 1 " \
        "around it by the benchmark: what the kernel's RCU grace periods cost. Every FREEZE " \
        f"comes {measure.IDLE} s and a random 0 to {measure.JITTER * 1e3:g} ms after the " \
        "last THAW: the random part starts it at a random point of the tick, as a host's " \
        "FREEZE, which knows nothing of the guest's tick, starts (a whole number of ticks " \
        "after a THAW that ended on one would start each side at its own fixed point, run " \
        "after run). The idle is as in real use: a FIFREEZE takes the " \
        "superblock's three percpu rw-semaphores for writing, and each waits for an RCU " \
        "grace period unless that superblock was thawed a few milliseconds before." + \
        optin + "\n\n" + _table(
            ["filesystems", "dirty", "who", "FREEZE", "ratio", "THAW", "ratio",
             "longest blocked write", "ratio"], rows) + \
        "\n\n![latency against filesystem count](bench/out/scale.png)"


def repeats(reps: int, n: int) -> int:
    """More of them where one FREEZE is short: each row's mean takes SAMPLES freezes of
    single filesystems at least, since each FIFREEZE is one of two times a tick apart."""
    return max(reps, SAMPLES // n)


def measure_interval(counts: list[int]) -> str:
    from bench.common import write_interval

    lo, hi = write_interval(min(counts)), write_interval(max(counts))
    return f"{lo * 1e3:g} ms" if lo == hi else \
        f"{lo * 1e3:g} ms, up to {hi * 1e3:g} ms at {max(counts)} filesystems, so that " \
        "two CPUs can keep up"


def _startup(work: str, reps: int) -> str:
    print(f"\n## 3. Memory and start-up (median of {reps})", flush=True)
    rows = []
    with devices.filesystems(work, 1, 64) as fss:
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


def _one_freeze(work: str, reps: int) -> str:
    print(f"\n## 4. One FREEZE, step by step (median of {reps})", flush=True)
    with devices.filesystems(work, 1, 64) as fss:
        traced = measure.trace_freeze(work, fss[0].mountpoint, reps)
    head = "## 4. One FREEZE, step by step\n\n"
    if traced is None:
        return head + "Not measured: `perf` is not installed, or it traced nothing."
    steps, base = traced
    rows = [[s, f"{ms_:.2f} ms"] for s, ms_ in steps.items()]
    rows.append(["baseline: FIFREEZE in-process, same filesystem, same run", f"{base:.2f} ms"])
    return head + "The root child's system calls during a FREEZE of one clean ext4 filesystem, " \
        "timed from outside by `perf trace` (the kernel's syscall tracepoints): from the " \
        "request's `recvmsg` to the first `openat` (the thread check), selection (the mount " \
        "table and every loop device's backing file, to the budget's `pwrite64`), opening " \
        "and checking the target (the mount table again, to the first record to the thaw " \
        "guard), arming the guard (its descriptors and deadline, to the `syncfs`, or to the " \
        "FIFREEZE when there is nothing to flush, as here), the FIFREEZE " \
        "`ioctl`, and from its return to the reply's `sendmsg` (the guard told and " \
        "disarmed). The last row is the baseline's " \
        "FIFREEZE, timed around the ioctl, in turns with the agent's.\n\n" + \
        _table(["step", "median"], rows)


def _plot(points: list[tuple[int, dict[str, measure.Run]]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no plot)", file=sys.stderr)
        return
    n = [p[0] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {measure.BASELINE: "o--", measure.AGENT: "o-", measure.OPT_IN: "^-",
              measure.EXPEDITED: "^:"}
    for way, style in styles.items():
        if all(way in p[1] for p in points):
            left.plot(n, [p[1][way].freeze * 1e3 for p in points], style, label=f"{way}")
            right.plot(n, [p[1][way].stall * 1e3 for p in points], style, label=f"{way}")
    for ax, what in ((left, "FREEZE latency"), (right, "longest blocked write")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("filesystems frozen (clean ext4)")
        ax.set_ylabel(f"{what} (ms)")
        ax.set_title(what)
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
            "(`etc/hv-vss-agent.toml`: no frontend) unless a row says otherwise. "
            "Tests never assert on these numbers.\n\n"
            + "\n\n".join(sections) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
