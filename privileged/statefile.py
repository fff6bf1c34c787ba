"""The state directory: the crash record and the frozen-time budget, kept outside any freeze.

A Linux freeze outlives the process that made it, so a SIGKILLed child would
leave its filesystems frozen.  Before freezing, the child writes the list of
targets to the crash record in [state] dir (tmpfs /run by default); it
empties the record after thawing.  The next child reads it before anything
else and thaws what it names.  The directory must never be on a filesystem
we freeze (selection makes that a veto), so these writes never block and
never land in a snapshot.

Both files are opened once, at start-up, before the sandbox: afterwards the
child writes only through these two descriptors and can open nothing for
writing, create, rename or remove (privileged/sandbox.py).  So no update is a
create-and-rename; each is a single write(2) that a kill cannot tear:
- crash record: "<fs_key> <mountpoint>" lines, written in one write before
  the first freeze; "-<fs_key>" appended for a target someone else had
  frozen (not ours to thaw); truncated to nothing after the thaw.  Mountpoints
  are escaped as in mountinfo.  A torn last line (no newline) is ignored;
  With [freeze] rcu_expedited, "rcu_expedited <value>" is appended before
  /sys/kernel/rcu_expedited is changed, "-rcu_expedited" once it is restored
  (privileged/rcu.py);
- budget: "<seconds left> <CLOCK_MONOTONIC time>" in a fixed width, rewritten
  in place (CLOCK_MONOTONIC is shared by every process and, like /run, starts
  again at boot).

FreeBSD keeps no state (StateDir(enabled=False)): a UFS suspension lasts only
as long as the /dev/ufssuspend descriptor that made it, and the kernel
closes a dead child's descriptors, which resumes its filesystems
(ffs_susp_dtor).  The budget then lasts as long as the child does.
"""


from __future__ import annotations

import fcntl
import os
import stat

from privileged.mounts import escape, unescape
from privileged.safe_path import directories_reason

RECORD, BUDGET = "frozen", "budget"
RCU = "rcu_expedited"  # a crash-record key no fs_key can be (those are major:minor)
_MAX_READ = 1 << 20
_BUDGET_FORMAT = "{:020.6f} {:020.6f}\n"  # always 42 bytes: rewritten in place


class StateError(OSError):
    pass


class StateDir:
    def __init__(self, path: str, enabled: bool = True) -> None:
        self.path, self.real, self.enabled = path, os.path.realpath(path), enabled
        self._record = self._budget = -1

    def open(self) -> None:
        """Make the directory if need be, check it, and open both files for good."""
        if not self.enabled:
            return
        real = self.real = os.path.realpath(self.path)  # what the check and the open see
        reason = directories_reason(real)
        if reason:
            raise StateError(f"state directory {self.path}: {reason}")
        try:
            os.mkdir(real, 0o700)
        except FileExistsError:
            pass
        dirfd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(dirfd)
            if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
                raise StateError(f"state directory {self.path} must be a root-owned directory "
                                 f"with mode 0700 (found mode {stat.S_IMODE(st.st_mode):04o}, "
                                 f"uid {st.st_uid})")
            self._record = _open_file(dirfd, RECORD, os.O_APPEND)
            self._budget = _open_file(dirfd, BUDGET, 0)
        finally:
            os.close(dirfd)

    def fds(self) -> tuple[int, ...]:
        return tuple(fd for fd in (self._record, self._budget) if fd >= 0)

    # --- the crash record ------------------------------------------------------------

    def write(self, entries: list[tuple[str, str]]) -> None:
        if self.enabled:
            os.ftruncate(self._record, 0)
            os.write(self._record, "".join(f"{k} {escape(p)}\n" for k, p in entries).encode())

    def drop(self, fs_key: str) -> None:
        """A target that is not ours to thaw after all."""
        if self.enabled:
            os.write(self._record, f"-{fs_key}\n".encode())

    def note_rcu(self, value: str) -> None:
        """/sys/kernel/rcu_expedited is about to change: this is the value to restore."""
        if self.enabled:
            os.write(self._record, f"{RCU} {value}\n".encode())

    def rcu_restored(self) -> None:
        if self.enabled:
            os.write(self._record, f"-{RCU}\n".encode())

    def read_rcu(self) -> str | None:
        """The value a killed predecessor left to restore, if any."""
        if not self.enabled:
            return None
        value = None
        text = os.pread(self._record, _MAX_READ, 0).decode("utf-8", "replace")
        for line in text.split("\n")[:-1]:
            key, _, rest = line.partition(" ")
            if key == RCU:
                value = rest
            elif key == f"-{RCU}":
                value = None
        return value

    def clear(self) -> None:
        if self.enabled:
            os.ftruncate(self._record, 0)

    def read(self) -> list[tuple[str, str]]:
        text = os.pread(self._record, _MAX_READ, 0).decode("utf-8", "replace") \
            if self.enabled else ""
        entries = [line.partition(" ") for line in text.split("\n")[:-1]]  # [:-1]: torn
        dropped = {key[1:] for key, sep, _ in entries if key.startswith("-") and not sep}
        return [(key, unescape(path)) for key, sep, path in entries
                if sep and key[:1] not in ("", "-") and path.startswith("/") and key not in dropped]

    # --- the budget -----------------------------------------------------------------------

    def read_budget(self) -> tuple[float, float] | None:
        """(seconds left, when), or None if there is no readable record."""
        try:
            left, when = map(float, os.pread(self._budget, 64, 0).split()[:2])
        except (OSError, ValueError):  # not enabled (fd -1), or not two numbers
            return None
        return (left, when) if all(abs(x) < float("inf") for x in (left, when)) else None

    def write_budget(self, left: float, when: float) -> None:
        if self.enabled:
            os.pwrite(self._budget, _BUDGET_FORMAT.format(left, when).encode(), 0)


def _open_file(dirfd: int, name: str, extra: int) -> int:
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | extra, 0o600,
                 dir_fd=dirfd)
    if fd <= 2:  # 0-2 are closed on Linux: never let a stray write to stderr land here
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        os.close(fd)
        fd = high
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        os.close(fd)
        raise StateError(f"state file {name} is not a regular file of ours with one link")
    return fd
