"""privileged/concurrent.py: every item done once, threads only where they pay, none left."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable

from privileged import concurrent


def _run(n: int, seconds: float, *, eager: bool, clock: Callable[[], float] = time.monotonic
         ) -> tuple[list[int], set[int], int, int]:
    """What each() did: items done, threads that did them, threads it said it started, and
    threads left after it, as the kernel lists them (/proc/self/task, counted against those
    before: a thread an earlier test left blocked in this process is not each()'s)."""
    done: list[int] = []
    idents: set[int] = set()

    def work(i: int) -> None:
        time.sleep(seconds)
        done.append(i)
        idents.add(threading.get_ident())

    before = len(os.listdir("/proc/self/task"))
    threads = concurrent.each(range(n), work, eager=eager, clock=clock)
    return done, idents, threads, len(os.listdir("/proc/self/task")) - before


def test_a_freeze_runs_every_item_once_in_threads_and_leaves_none(monkeypatch):
    waited: list[int] = []
    real_wait = concurrent.wait_single_threaded
    monkeypatch.setattr(concurrent, "wait_single_threaded",
                        lambda: waited.append(1) or real_wait())
    done, idents, threads, left = _run(40, 0.01, eager=True)
    assert sorted(done) == list(range(40))
    assert threads == 40 and threading.get_ident() not in idents
    # joined, and then waited for until the kernel let them go (a race to see without it)
    assert left == 0 and waited == [1]


def test_a_thaw_stays_in_the_main_thread_while_each_item_is_quick():
    """Quick as each() sees it: its clock moves 0.5 ms, half of SLOW, each time it looks
    (the machine's may move more, when another process takes the CPU between two items,
    and that is not what is tested here)."""
    looks = itertools.count()
    done, idents, threads, _ = _run(200, 0.0, eager=False, clock=lambda: next(looks) * 0.0005)
    assert sorted(done) == list(range(200))
    assert (threads, idents) == (0, {threading.get_ident()})


def test_a_thaw_calls_threads_in_when_items_are_slow():
    done, idents, threads, left = _run(40, 0.005, eager=False)
    assert sorted(done) == list(range(40))
    assert threads > 0 and len(idents) > 1
    assert left == 0


def test_a_slow_thaw_calls_a_thread_in_after_its_first_four_items():
    """Four slow thaws in the main thread are enough to judge by: with a fifth still to do,
    a worker is started for it (which of the two takes it is a race)."""
    done, _, threads, left = _run(5, 0.005, eager=False)
    assert sorted(done) == list(range(5))
    assert (threads, left) == (1, 0)


def test_stop_ends_the_work_and_the_deadline_action_runs_once_while_a_worker_blocks():
    release = threading.Event()
    fired: list[float] = []
    done: list[int] = []

    def work(i: int) -> None:
        if i == 0:
            release.wait(5)  # a freeze that blocks
        done.append(i)

    def at_deadline() -> None:
        fired.append(time.monotonic())
        release.set()

    start = time.monotonic()
    concurrent.each(range(3), work, eager=True, at=(start + 0.2, at_deadline))
    assert len(fired) == 1 and 0.15 < fired[0] - start < 2
    assert sorted(done) == [0, 1, 2]
    stopped: list[int] = []
    concurrent.each(range(100), stopped.append, eager=False, stop=lambda: len(stopped) >= 5)
    assert len(stopped) == 5


def test_the_deadline_action_is_not_run_when_every_worker_finished_in_time():
    fired: list[bool] = []
    done: list[int] = []
    concurrent.each(range(3), done.append, eager=True,
                    at=(time.monotonic() + 30, lambda: fired.append(True)))
    assert sorted(done) == [0, 1, 2]
    assert fired == []
