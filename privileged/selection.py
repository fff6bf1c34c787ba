"""Which mounted filesystems to freeze, which to ignore, which veto a backup.

One function, `select_targets()`, makes the decision for CHECK and for FREEZE alike, so
CHECK never promises what FREEZE cannot do.  It is pure: it takes mount
records (read by the platform's mount module) and the root-owned config, and
it never sees anything from the parent.

Rules, in order, for each mount:
  1. pseudo, network and read-only filesystems are never candidates;
  2. [freeze] only (if set) keeps exactly those mountpoints; [freeze] exclude
     (paths or globs) removes some; both are the operator's choice, not vetoes;
  3. a filesystem the platform can freeze is a target, once per filesystem
     (bind mounts and btrfs subvolumes share one superblock);
  4. ZFS follows [check] zfs; EFI-style FAT filesystems are crash-consistent
     only (logged) in the default mode, vetoes in strict mode;
  5. any other read-write local filesystem cannot be frozen: it vetoes.
Strict mode ([check] mode = "strict") restores the stock FreeBSD daemon's rule:
every read-write non-freezable filesystem vetoes; on FreeBSD (whose daemon it
is) pseudo and network filesystems too, unless the operator left them out with
[freeze] only or exclude.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from privileged.config import ChildConfig


@dataclass(frozen=True, slots=True)
class Mount:
    """A mounted filesystem as the root child sees it, on either platform."""

    mountpoint: str
    fstype: str
    source: str
    readonly: bool
    local: bool  # not a network filesystem
    pseudo: bool  # no backing storage of its own (proc, tmpfs, devfs, nullfs, ...)
    fs_key: str  # identity of the filesystem: Linux "maj:min" of the sb, FreeBSD fsid
    backing_file: str | None = None  # Linux loop devices: the file behind the device
    mount_id: int = 0  # Linux: mountinfo's first field, the kernel's id of this mount


@dataclass(frozen=True, slots=True)
class Platform:
    """What a platform can freeze; the rest of the rules are shared."""

    name: str
    freezable: frozenset[str]
    crash_consistent: frozenset[str]  # FAT: harmless to leave unfrozen by default
    zfs: frozenset[str] = frozenset({"zfs"})
    ignored_prefixes: tuple[str, ...] = ()  # FreeBSD: /dev, on a path boundary
    # Strict mode is the stock hv_vss_daemon's rule: pseudo and network filesystems veto too.
    strict_vetoes_every_writable: bool = False
    # Linux: a freeze outlives its holder, so the child keeps a crash record (statefile.py);
    # FreeBSD: closing the /dev/ufssuspend descriptor resumes, so there is nothing to record.
    freeze_outlives_holder: bool = True


class Verdict(enum.Enum):
    FREEZE = "freeze"
    IGNORE = "ignore"
    CRASH_ONLY = "crash-consistent only"
    VETO = "veto"


@dataclass(frozen=True, slots=True)
class Decision:
    mount: Mount
    verdict: Verdict
    reason: str


@dataclass(slots=True)
class Selection:
    targets: list[Mount] = field(default_factory=list)  # in freeze order
    # The same targets by dependency level: each level is frozen after the one before it,
    # the filesystems of one level independently of each other (at once, on Linux).
    levels: list[list[int]] = field(default_factory=list)  # indices into targets
    decisions: list[Decision] = field(default_factory=list)
    missing_only: list[str] = field(default_factory=list)  # [freeze] only entries not found

    @property
    def vetoes(self) -> list[Decision]:
        return [d for d in self.decisions if d.verdict is Verdict.VETO]

    @property
    def crash_only(self) -> list[Decision]:
        return [d for d in self.decisions if d.verdict is Verdict.CRASH_ONLY]

    def veto_reason(self) -> tuple[str, str] | None:
        """(mountpoint, why) of the first reason CHECK must say no, if any."""
        if self.missing_only:
            return self.missing_only[0], "listed in [freeze] only but not a freezable mount"
        for d in self.vetoes:
            return d.mount.mountpoint, d.reason
        return None


def under(path: str, top: str) -> bool:
    """True if `path` is `top` or below it, on a path-component boundary."""
    if top == "/":
        return path.startswith("/")
    return path == top or path.startswith(top.rstrip("/") + "/")


def _excluded(mountpoint: str, patterns: Iterable[str]) -> bool:
    return any(mountpoint == p or fnmatch.fnmatchcase(mountpoint, p) for p in patterns)


def classify(m: Mount, cfg: ChildConfig, plat: Platform) -> Decision:
    strict = cfg.check.mode == "strict"

    def d(v: Verdict, why: str) -> Decision:
        return Decision(m, v, why)

    if any(under(m.mountpoint, p) for p in plat.ignored_prefixes):
        return d(Verdict.IGNORE, "device filesystem")
    if m.readonly:
        return d(Verdict.IGNORE, "read-only")
    left_out = (cfg.freeze.only and m.mountpoint not in cfg.freeze.only) or _excluded(
        m.mountpoint, cfg.freeze.exclude)
    if strict and plat.strict_vetoes_every_writable and m.fstype not in plat.freezable \
            and not left_out:
        only = ", ".join(sorted(plat.freezable))
        return d(Verdict.VETO, f"read-write {m.fstype} filesystem ([check] mode = \"strict\": "
                               f"only {only} may be mounted read-write, as in the stock daemon)")
    if not m.local:
        return d(Verdict.IGNORE, f"network filesystem ({m.fstype})")
    if m.pseudo:
        return d(Verdict.IGNORE, f"pseudo filesystem ({m.fstype})")
    if cfg.freeze.only and m.mountpoint not in cfg.freeze.only:
        return d(Verdict.IGNORE, "not listed in [freeze] only")
    if _excluded(m.mountpoint, cfg.freeze.exclude):
        return d(Verdict.IGNORE, "excluded by [freeze] exclude")
    if m.fstype in plat.freezable:
        return d(Verdict.FREEZE, m.fstype)
    if m.fstype in plat.zfs:
        if cfg.check.zfs == "veto" or strict:
            return d(Verdict.VETO, "ZFS cannot be suspended ([check] zfs = \"veto\")")
        return d(Verdict.CRASH_ONLY, "ZFS datasets get crash consistency only "
                                     "(copy-on-write keeps them intact)")
    if m.fstype in plat.crash_consistent and not strict:
        return d(Verdict.CRASH_ONLY, f"{m.fstype} cannot be frozen: crash-consistent only")
    return d(Verdict.VETO, f"read-write local {m.fstype} filesystem cannot be frozen")


def select_targets(mounts: Sequence[Mount], cfg: ChildConfig, plat: Platform) -> Selection:
    sel = Selection()
    seen: set[str] = set()
    chosen: list[tuple[int, Mount]] = []
    for i, m in enumerate(mounts):
        dec = classify(m, cfg, plat)
        if dec.verdict is Verdict.FREEZE and m.fs_key in seen:
            dec = Decision(m, Verdict.IGNORE, "same filesystem as another target")
        elif dec.verdict is Verdict.FREEZE:
            seen.add(m.fs_key)
            chosen.append((i, m))
        sel.decisions.append(dec)
    found = {m.mountpoint for _, m in chosen} | {
        d.mount.mountpoint for d in sel.decisions if d.reason == "same filesystem as another target"
    }
    sel.missing_only = [p for p in cfg.freeze.only if p not in found]
    sel.targets = order(chosen, mounts)
    sel.levels = levels(sel.targets, mounts)
    return sel


def levels(targets: Sequence[Mount], mounts: Sequence[Mount]) -> list[list[int]]:
    """Dependency levels of targets in freeze order: a target's level is one above the
    highest of those that must be frozen before it (a filesystem mounted inside it, a
    loop-backed filesystem whose image it holds), and `/` has a level of its own, last.
    Indices within a level keep the freeze order."""
    after: dict[str, set[str]] = {m.fs_key: set() for m in targets}
    for earlier, later in _dependencies(targets, mounts).items():
        for k in later:
            after[k].add(earlier)
    level: dict[str, int] = {}
    for m in targets:  # freeze order: whatever must precede m has its level already
        level[m.fs_key] = 1 + max((level[e] for e in after[m.fs_key] if e in level),
                                  default=-1)
    top = max(level.values(), default=-1)
    for m in targets:
        if m.mountpoint == "/":
            level[m.fs_key] = top + 1
    out: list[list[int]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for i, m in enumerate(targets):
        out[level[m.fs_key]].append(i)
    return [lv for lv in out if lv]


def order(chosen: Sequence[tuple[int, Mount]], mounts: Sequence[Mount]) -> list[Mount]:
    """Freeze order: what depends on a filesystem is frozen before it.

    A filesystem mounted inside another goes first, and so does a loop-backed
    filesystem before the one holding its backing file (freezing the outer one
    first would leave the inner one's flush blocked on it).  `/` goes last.
    Ties go newest mount first, as the peer agents do.  Thaw is the reverse.
    """
    must_precede = _dependencies([m for _, m in chosen], mounts)
    indegree = dict.fromkeys(must_precede, 0)
    for later_keys in must_precede.values():
        for later in later_keys:
            indegree[later] += 1
    by_key = {m.fs_key: (i, m) for i, m in chosen}
    result: list[Mount] = []
    ready = [k for k, n in indegree.items() if n == 0]
    while ready:
        # newest first, `/` only when nothing else is ready
        ready.sort(key=lambda k: (by_key[k][1].mountpoint == "/", -by_key[k][0]))
        k = ready.pop(0)
        result.append(by_key[k][1])
        for later in must_precede[k]:
            indegree[later] -= 1
            if indegree[later] == 0:
                ready.append(later)
    if len(result) < len(by_key):  # a cycle (odd bind mounts): fall back to newest first
        rest = sorted((t for t in by_key.values() if t[1] not in result), key=lambda t: -t[0])
        result.extend(m for _, m in rest)
    return result


def _dependencies(targets: Sequence[Mount], mounts: Sequence[Mount]) -> dict[str, set[str]]:
    """fs_key -> the fs_keys that must be frozen after it.  Found by walking up each
    target's mountpoint and backing file, not by comparing every pair: hundreds of
    targets are common on hosts with many volumes."""
    keys = {m.fs_key for m in targets}
    # Every mountpoint of each target filesystem, to match bind mounts too.
    at: dict[str, set[str]] = {}
    newest: dict[str, str] = {}  # mountpoint -> fs_key of the last mount there
    for m in mounts:
        newest[m.mountpoint] = m.fs_key
        if m.fs_key in keys:
            at.setdefault(m.mountpoint, set()).add(m.fs_key)
    must_precede: dict[str, set[str]] = {k: set() for k in keys}
    for a in targets:
        for p in _ancestors(a.mountpoint):
            must_precede[a.fs_key] |= at.get(p, set()) - {a.fs_key}
        if a.backing_file:
            holder = next((newest[p] for p in (a.backing_file, *_ancestors(a.backing_file))
                           if p in newest), None)
            if holder in keys and holder != a.fs_key:
                must_precede[a.fs_key].add(holder)
    return must_precede


def _ancestors(path: str) -> list[str]:
    """The directories above a path, nearest first, `/` last."""
    out = []
    while path not in ("/", ""):
        path = path.rsplit("/", 1)[0] or "/"
        out.append(path)
    return out


def _holder_of(path: str, mounts: Sequence[Mount]) -> str | None:
    """The filesystem a path lives on: the longest mountpoint above it."""
    best: Mount | None = None
    for m in mounts:
        longer = best is None or len(m.mountpoint) >= len(best.mountpoint)
        if longer and under(path, m.mountpoint):
            best = m
    return best.fs_key if best else None
