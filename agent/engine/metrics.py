"""Prometheus metrics in node_exporter's textfile format ([metrics] dir).

The file is written by the engine atomically (a temporary file, then
rename(2) in the same directory), so node_exporter never reads half a file,
and never while anything is frozen: when nothing is frozen and no transaction
is open, at least every [metrics] interval seconds; once more just before the
engine asks the child to freeze (hv_vss_agent_frozen 1: the file then stays
as it is until the thaw); and on the way out (hv_vss_agent_up 0), unless the
engine cannot be sure everything was thawed.  At start-up the directory is
refused if it is on a filesystem the freeze selection includes: a write there
could block on a frozen filesystem.

A killed agent (SIGKILL, or any death it cannot act on) leaves the file as it
last wrote it, hv_vss_agent_up 1 included; no file can say more than that.
hv_vss_agent_write_time_seconds says when it was written: older than
[metrics] interval plus [watchdog] max_frozen_seconds means the agent is not
running (or not serving), whatever up says.  The next start rewrites the file
at once.

The directory is opened by root before the chroot and the descriptor is kept
for the process's lifetime.  Be clear about what that means: a descriptor to
a directory outside the chroot is a way out of it.  openat(fd, "..") walks
up from there to the real root, so the engine can reach every file that the
unprivileged account may read or write, chroot or not; the chroot no longer
limits the engine's file access, only the account's permissions do (and the
seccomp filter).  The frontend, which faces untrusted clients, never
holds this descriptor.  Leave [metrics] dir unset to keep the chroot whole.
"""

from __future__ import annotations

import os

FILENAME = "hv_vss_agent.prom"
PREFIX = "hv_vss_agent"

COUNTERS = {
    "requests": ("Kernel requests received, by operation.", "op", "requests_"),
    "replies": ("Replies sent to the kernel, by result.", "result", "replies_"),
}
SINGLE_COUNTERS = {
    "freezes": "Successful freezes.",
    "freeze_failures": "FREEZE requests the child could not carry out.",
    "auto_thaws": "Thaws the child did by itself (watchdog or signal).",
    "subscriber_failures": "Transactions failed because of a subscriber.",
    "subscribers_skipped": "Subscriber failures left behind under [notify] policy = skip.",
    "kernel_reconnects": "Times the kernel channel was lost and reopened.",
}
HISTOGRAMS = {
    "frozen": ("frozen_seconds", "How long the filesystems stayed frozen."),
    "freeze": ("freeze_seconds", "How long the child took to freeze the filesystems."),
}


def render(status: dict[str, object], *, frozen: bool = False, up: bool = True) -> str:
    """`frozen`: the file is written just before a freeze and stays so until the thaw."""
    counters = status.get("counters") or {}
    assert isinstance(counters, dict)
    out: list[str] = []
    out += _help("up", "gauge", "1 while the agent runs, 0 once it has stopped; a killed agent "
                 "leaves 1: see write_time_seconds.")
    out.append(f"{PREFIX}_up {int(up)}")
    out += _help("frozen", "gauge", "1 from just before the agent freezes until it has thawed.")
    out.append(f"{PREFIX}_frozen {int(frozen)}")
    out += _help("write_time_seconds", "gauge", "When the agent wrote this file, in Unix time: "
                 "at least every [metrics] interval, except while frozen.")
    out.append(f"{PREFIX}_write_time_seconds {status.get('time', 0)}")
    agent = status.get("agent") or {}
    assert isinstance(agent, dict)
    out += _help("start_time_seconds", "gauge", "When the agent started, in Unix time.")
    out.append(f"{PREFIX}_start_time_seconds {agent.get('started', 0)}")
    for name, (text, label, prefix) in COUNTERS.items():
        out += _help(f"{name}_total", "counter", text)
        values = {k[len(prefix):]: v for k, v in counters.items() if k.startswith(prefix)}
        for key in sorted(values):
            out.append(f'{PREFIX}_{name}_total{{{label}="{key}"}} {values[key]}')
    for name, text in SINGLE_COUNTERS.items():
        out += _help(f"{name}_total", "counter", text)
        out.append(f"{PREFIX}_{name}_total {counters.get(name, 0)}")
    histograms = status.get("histograms") or {}
    assert isinstance(histograms, dict)
    for key, (name, text) in HISTOGRAMS.items():
        h = histograms.get(key)
        if not isinstance(h, dict):
            continue
        out += _help(name, "histogram", text)
        for le, n in h["buckets"].items():
            out.append(f'{PREFIX}_{name}_bucket{{le="{le}"}} {n}')
        out.append(f"{PREFIX}_{name}_sum {h['sum']}")
        out.append(f"{PREFIX}_{name}_count {h['count']}")
    return "\n".join(out) + "\n"


def _help(name: str, kind: str, text: str) -> list[str]:
    return [f"# HELP {PREFIX}_{name} {text}", f"# TYPE {PREFIX}_{name} {kind}"]


class MetricsWriter:
    def __init__(self, dirfd: int) -> None:
        self.dirfd = dirfd

    def write(self, text: str) -> None:
        tmp = f".{FILENAME}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644, dir_fd=self.dirfd)
        try:
            os.fchmod(fd, 0o644)  # whatever the umask, node_exporter must read it
            data = text.encode()
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
        os.rename(tmp, FILENAME, src_dir_fd=self.dirfd, dst_dir_fd=self.dirfd)
