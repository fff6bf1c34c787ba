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

from privileged.child_config import ChildConfig
from privileged.mounts import Mount, Platform

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

SAME = "same filesystem as another target"


class Verdict:
    """What selection decides for a mount (strings, compared with `is`)."""

    FREEZE, IGNORE, CRASH_ONLY, VETO = "freeze", "ignore", "crash-consistent only", "veto"


class Decision:
    def __init__(self, mount: Mount, verdict: str, reason: str) -> None:
        self.mount, self.verdict, self.reason = mount, verdict, reason


class Selection:
    def __init__(self) -> None:
        self.targets: list[Mount] = []  # in freeze order
        # The same targets by dependency level (indices into targets): each level is frozen
        # after the one before it, its filesystems independently of each other (at once, on
        # Linux).
        self.levels: list[list[int]] = []
        self.decisions: list[Decision] = []
        self.missing_only: list[str] = []  # [freeze] only entries not found

    def of(self, verdict: str) -> list[Decision]:
        return [d for d in self.decisions if d.verdict is verdict]

    def veto_reason(self) -> tuple[str, str] | None:
        """(mountpoint, why) of the first reason CHECK must say no, if any."""
        if self.missing_only:
            return self.missing_only[0], "listed in [freeze] only but not a freezable mount"
        vetoes = self.of(Verdict.VETO)
        return (vetoes[0].mount.mountpoint, vetoes[0].reason) if vetoes else None


def under(path: str, top: str) -> bool:
    """True if `path` is `top` or below it, on a path-component boundary."""
    return path.startswith("/") if top == "/" else path == top or path.startswith(top + "/")


def glob_match(name: str, pattern: str) -> bool:
    """fnmatch.fnmatchcase(name, pattern) without the re module: `*` (slashes too), `?`,
    `[seq]` and `[!seq]` with ranges, a `[` without its `]` is itself.  Linear passes,
    however many stars (tests/test_selection.py compares it with fnmatch)."""
    items: list[tuple[bool, list[tuple[str, str]]] | None] = []  # (negated, ranges); None: *
    i = 0
    while i < len(pattern):
        c, i = pattern[i], i + 1
        # fnmatch's rule: the set ends at the first "]" after a leading "!" and one "]"
        end = pattern.find("]", i + (pattern[i:i + 1] == "!") + 1) if c == "[" else -1
        if c == "*":
            items += [] if items and items[-1] is None else [None]
        elif end < 0:
            items.append((c == "?", [] if c == "?" else [(c, c)]))  # "?": not in no range
        else:
            items.append(_char_set(pattern[i:end]))
            i = end + 1
    n = p = 0
    star = resume = -1
    while n < len(name):
        item = items[p] if p < len(items) else False
        if item is None:  # a star: let it take nothing for now
            star, resume, p = p + 1, n, p + 1
        elif isinstance(item, tuple) and item[0] != any(lo <= name[n] <= hi
                                                        for lo, hi in item[1]):
            n, p = n + 1, p + 1
        elif star >= 0:  # a mismatch: the last star takes one character more
            resume += 1
            n, p = resume, star
        else:
            return False
    return all(item is None for item in items[p:])


def _char_set(body: str) -> tuple[bool, list[tuple[str, str]]]:
    """fnmatch's reading of "[body]": split at the hyphens that make ranges, drop each
    reversed range with its two ends (so "[z-a!]" is "[!]", any character), then a
    leading "!" negates; other hyphens are themselves.  (negated, ranges)."""
    chunks, start, k = [], 0, 2 if body[:1] == "!" else 1
    while (k := body.find("-", k)) >= 0:
        chunks.append(body[start:k])
        start, k = k + 1, k + 3
    if body[start:] or not chunks:
        chunks.append(body[start:])
    else:
        chunks[-1] += "-"
    for k in range(len(chunks) - 1, 0, -1):
        if chunks[k - 1][-1] > chunks[k][0]:
            chunks[k - 1] = chunks[k - 1][:-1] + chunks[k][1:]
            del chunks[k]
    negated = chunks[0][:1] == "!"
    chunks[0] = chunks[0][negated:]
    ranges = [(c, c) for chunk in chunks for c in chunk]
    for j in range(1, len(chunks)):  # "[!-x]": that hyphen is itself
        ranges.append((chunks[j - 1][-1], chunks[j][0]) if chunks[j - 1] else ("-", "-"))
    return negated, ranges


def classify(m: Mount, cfg: ChildConfig, plat: Platform) -> Decision:
    strict = cfg.check.mode == "strict"
    only, exclude = cfg.freeze.only, cfg.freeze.exclude
    excluded = any(m.mountpoint == p or glob_match(m.mountpoint, p) for p in exclude)
    if any(under(m.mountpoint, p) for p in plat.ignored_prefixes):
        return Decision(m, Verdict.IGNORE, "device filesystem")
    if m.readonly:
        return Decision(m, Verdict.IGNORE, "read-only")
    if strict and plat.strict_vetoes_every_writable and m.fstype not in plat.freezable \
            and not excluded and (not only or m.mountpoint in only):
        return Decision(m, Verdict.VETO, f"read-write {m.fstype} filesystem ([check] mode = "
                        f"\"strict\": only {', '.join(sorted(plat.freezable))} may be mounted "
                        "read-write, as in the stock daemon)")
    if not m.local:
        return Decision(m, Verdict.IGNORE, f"network filesystem ({m.fstype})")
    if m.pseudo:
        return Decision(m, Verdict.IGNORE, f"pseudo filesystem ({m.fstype})")
    if only and m.mountpoint not in only:
        return Decision(m, Verdict.IGNORE, "not listed in [freeze] only")
    if excluded:
        return Decision(m, Verdict.IGNORE, "excluded by [freeze] exclude")
    if m.fstype in plat.freezable:
        return Decision(m, Verdict.FREEZE, m.fstype)
    if m.fstype in plat.zfs and (cfg.check.zfs == "veto" or strict):
        return Decision(m, Verdict.VETO, "ZFS cannot be suspended ([check] zfs = \"veto\")")
    if m.fstype in plat.zfs:
        return Decision(m, Verdict.CRASH_ONLY, "ZFS datasets get crash consistency only "
                                               "(copy-on-write keeps them intact)")
    if m.fstype in plat.crash_consistent and not strict:
        return Decision(m, Verdict.CRASH_ONLY, f"{m.fstype} cannot be frozen: "
                                               "crash-consistent only")
    return Decision(m, Verdict.VETO, f"read-write local {m.fstype} filesystem cannot be frozen")


def select_targets(mounts: Sequence[Mount], cfg: ChildConfig, plat: Platform) -> Selection:
    sel = Selection()
    chosen: dict[str, Mount] = {}  # fs_key -> its first mount, in mount order
    for m in mounts:
        d = classify(m, cfg, plat)
        if d.verdict is Verdict.FREEZE and m.fs_key in chosen:
            d = Decision(m, Verdict.IGNORE, SAME)
        elif d.verdict is Verdict.FREEZE:
            chosen[m.fs_key] = m
        sel.decisions.append(d)
    found = {d.mount.mountpoint for d in sel.decisions if d.verdict is Verdict.FREEZE
             or d.reason == SAME}
    sel.missing_only = [p for p in cfg.freeze.only if p not in found]
    targets = list(chosen.values())
    precede = _dependencies(targets, mounts)
    sel.targets = order(targets, precede)
    sel.levels = levels(sel.targets, precede)
    return sel


def levels(targets: Sequence[Mount], precede: dict[str, set[str]]) -> list[list[int]]:
    """Dependency levels of targets in freeze order: a target's level is one above the
    highest of those that must be frozen before it (a filesystem mounted inside it, a
    loop-backed filesystem whose image it holds), and `/` has a level of its own, last.
    Indices within a level keep the freeze order."""
    level: dict[str, int] = {}
    for m in targets:  # freeze order: whatever must precede m has its level already
        level[m.fs_key] = 1 + max((level[k] for k in level if m.fs_key in precede[k]),
                                  default=-1)
    for m in targets:
        if m.mountpoint == "/":
            level[m.fs_key] = max(level.values()) + 1
    out: list[list[int]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for i, m in enumerate(targets):
        out[level[m.fs_key]].append(i)
    return [lv for lv in out if lv]


def order(chosen: list[Mount], precede: dict[str, set[str]]) -> list[Mount]:
    """Freeze order: what depends on a filesystem is frozen before it.

    A filesystem mounted inside another goes first (inside any of the other's
    mountpoints: bind mounts count), and so does a loop-backed filesystem
    before the one holding its backing file (freezing the outer one first
    would leave the inner one's flush blocked on it); so `/` goes last.
    Otherwise newest mount first, as the peer agents do.  A cycle (odd bind
    mounts) is broken where it closes.  Thaw is the reverse."""
    result: list[Mount] = []

    def place(t: Mount, path: list[Mount]) -> None:
        if t not in result and t not in path:
            for u in reversed(chosen):
                if t.fs_key in precede[u.fs_key]:
                    place(u, [*path, t])
            result.append(t)

    for t in reversed(chosen):
        place(t, [])
    return result


def _dependencies(targets: Sequence[Mount], mounts: Sequence[Mount]) -> dict[str, set[str]]:
    """fs_key -> the fs_keys that must be frozen after it.  Found by walking up each
    target's mountpoint and backing file, not by comparing every pair: hundreds of
    targets are common on hosts with many volumes."""
    keys = {m.fs_key for m in targets}
    at: dict[str, set[str]] = {}  # every mountpoint of each target, to match bind mounts too
    newest: dict[str, str] = {}  # mountpoint -> fs_key of the last mount there
    for m in mounts:
        newest[m.mountpoint] = m.fs_key
        if m.fs_key in keys:
            at.setdefault(m.mountpoint, set()).add(m.fs_key)
    precede: dict[str, set[str]] = {k: set() for k in keys}
    for a in targets:
        for p in _ancestors(a.mountpoint):
            precede[a.fs_key] |= at.get(p, set()) - {a.fs_key}
        if a.backing_file:
            holder = next((newest[p] for p in (a.backing_file, *_ancestors(a.backing_file))
                           if p in newest), None)
            if holder in keys and holder != a.fs_key:
                precede[a.fs_key].add(holder)
    return precede


def _ancestors(path: str) -> list[str]:
    """The directories above a path, nearest first, `/` last."""
    out = []
    while path not in ("/", ""):
        path = path.rsplit("/", 1)[0] or "/"
        out.append(path)
    return out
