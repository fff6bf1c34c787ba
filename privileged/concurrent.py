"""Independent filesystems frozen, and thawed, at the same time (Linux only).

Why: each FIFREEZE waits for RCU grace periods (freeze_super takes the
superblock's three sb_writers percpu rw-semaphores for writing, and each
percpu_down_write waits for one unless that superblock was thawed a moment
before): 8 to 25 ms per filesystem, and one after another they add up, to
seconds for hundreds.  Waits issued from several threads at once share their
grace periods.  FITHAW waits for none, but ext4 writes its superblock back
synchronously, which on a real disk is a round trip each.

How: for one dependency level at a time (selection.levels), worker threads
take the level's targets from a shared list and call the backend's one step
(freeze_one or thaw_one) on descriptors the main thread opened.  A worker
does nothing else: no log, no state file; it may send one record, a
target's index, on the socket to the thaw guard (one sendmsg: atomic).  At most
MAX_THREADS run; the main thread joins them all before the next level, and
before the child answers it waits until the kernel has let the last one go
(/proc/self/task lists the main thread alone again), so a FREEZE's threads
never outlive it.  A freeze starts its workers at once; a thaw does the work
in the main thread and starts workers only once its first thaws took longer
than SLOW each on average (on a fast device, 256 thaws take 10 ms in one thread, and starting the
threads would cost more than they save).

The thaw guard was forked at start-up, long before any worker (a fork of
a process with threads would copy one thread and whatever locks the others
held), and is disarmed after the last one is joined.  FreeBSD never comes here:
UFSSUSPEND must come from one single-threaded process (EDEADLK otherwise).
"""

from __future__ import annotations

import _thread  # threading's C half: threading would load five more modules into root
import os
import select
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

MAX_THREADS = 256
STACK = 256 << 10  # a worker's stack: it runs a few frames (glibc's default is 8 MiB)
SLOW = 0.001  # seconds: thaws this slow in the main thread call workers in for the rest
GONE_WITHIN = 1.0  # seconds for the kernel to let joined threads go


def each(items: Sequence[int], work: Callable[[int], None], *, eager: bool,
         stop: Callable[[], bool] = lambda: False,
         at: tuple[float, Callable[[], None]] | None = None,
         clock: Callable[[], float] = time.monotonic) -> int:
    """work(i) for every item, in worker threads; returns how many threads ran.

    `work` must not raise (it records its own outcome).  Once `stop()` is true no
    item is started.  `at` = (deadline, action): with eager workers, the main thread
    runs `action` if the deadline passes while they are still at work (then waits
    on)."""
    pending = list(reversed(items))
    lock = _thread.allocate_lock()

    def take() -> int | None:
        """The next item, or None once there is none or `stop()` is true."""
        with lock:
            return pending.pop() if pending and not stop() else None

    def loop(running: _thread.LockType) -> None:
        try:
            while (i := take()) is not None:
                work(i)
        finally:
            running.release()  # the join: the main thread waits for this lock

    workers: list[_thread.LockType] = []  # each held while its worker runs

    def spawn(n: int) -> None:
        _thread.stack_size(STACK)  # only this process's workers start threads
        for _ in range(n):
            running = _thread.allocate_lock()
            running.acquire()
            try:
                _thread.start_new_thread(loop, (running,))
            except RuntimeError:  # no thread to be had (a task limit): fewer, or none
                return
            workers.append(running)

    try:
        if eager and len(items) > 1:
            spawn(min(len(items), MAX_THREADS))
            deadline, action = at or (0.0, None)  # the workers take every item: wait
            for running in workers:
                if running.acquire(timeout=-1 if action is None else max(0.0, deadline - clock())):
                    running.release()
            if action is not None and any(running.locked() for running in workers):
                action()
        done, began = 0, clock()
        while (i := take()) is not None:
            work(i)
            done += 1
            if not eager and not workers and done >= 4 and (clock() - began) / done > SLOW:
                spawn(min(len(pending), MAX_THREADS))  # no worker yet to share it with
    finally:  # even if `action` raised: a worker left running could freeze after the rollback
        for running in workers:
            running.acquire()
        if workers:
            wait_single_threaded()
    return len(workers)


def wait_single_threaded() -> None:
    """Until the kernel lists this process's main thread alone: a joined Python thread may
    still be finishing its exit in the kernel for a moment."""
    deadline = time.monotonic() + GONE_WITHIN
    idle = select.poll()  # a wait the sandbox allows (no nanosleep there)
    while len(os.listdir("/proc/self/task")) > 1 and time.monotonic() < deadline:
        idle.poll(1)
