"""The frozen-time budget: how much freezing anyone may ask of the child (a token bucket).

A bucket holds up to [watchdog] budget_seconds of frozen time and refills at
budget_seconds_per_hour.  A FREEZE needs a full watchdog window
(max_frozen_seconds) in the bucket and takes it out before the first
filesystem is flushed; the THAW gives back what was not used.  So a backup
with a short freeze costs what it froze, and backups back to back are never
refused, while whatever the parent asks, filesystems are frozen at most
max_frozen_seconds at a time, and in any span of T seconds at most
budget_seconds + budget_seconds_per_hour * T / 3600.

Charged first, refunded after, and written to the state directory each time:
a child killed while frozen has spent its whole window, and a new child
starts from what the last one left (FreeBSD keeps no state directory: there
the budget lasts as long as the child).
"""


from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from privileged.statefile import StateDir


class Bucket:
    def __init__(self, capacity: float, per_second: float, left: float, when: float) -> None:
        self.capacity, self.per_second = capacity, per_second
        self.left, self.when = left, when  # `left` as reckoned at clock time `when`

    @classmethod
    def load(cls, state: StateDir, capacity: float, per_hour: float, now: float) -> Bucket:
        """The budget as the previous child left it (full if there is none)."""
        left, when = state.read_budget() or (capacity, now)
        budget = cls(capacity, per_hour / 3600.0, max(0.0, min(left, capacity)), min(when, now))
        budget.refill(now)
        return budget

    def refill(self, now: float) -> None:
        if now > self.when:
            self.left = min(self.capacity, self.left + (now - self.when) * self.per_second)
            self.when = now

    def take(self, amount: float, now: float) -> bool:
        self.refill(now)
        if self.left < amount:
            return False
        self.left -= amount
        return True

    def give_back(self, amount: float, now: float) -> None:
        self.refill(now)
        self.left = min(self.capacity, self.left + max(0.0, amount))

    def seconds_until(self, amount: float, now: float) -> float:
        """How long until `amount` is in the bucket (inf if it never refills)."""
        self.refill(now)
        short = amount - self.left
        if short <= 0:
            return 0.0
        return short / self.per_second if self.per_second > 0 else float("inf")

    def save(self, state: StateDir) -> None:
        state.write_budget(self.left, self.when)
