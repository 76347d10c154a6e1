"""The model's lock: a click waiting for the network goes before background work waiting for it."""

import threading
import time

from mvseg.scheduling import PriorityLock


def _waiter(lock, background, order, name, started):
    def run():
        if background:
            with lock.background():
                started.set()
                with lock:
                    order.append(name)
        else:
            started.set()
            with lock:
                order.append(name)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_waiting_click_goes_before_waiting_background_work():
    lock, order = PriorityLock(), []
    with lock:  # a forward in progress
        events = [threading.Event() for _ in range(3)]
        threads = [_waiter(lock, True, order, "auto", events[0])]
        events[0].wait(5)
        time.sleep(0.05)  # the background thread is now waiting
        threads.append(_waiter(lock, True, order, "scoring", events[1]))
        events[1].wait(5)
        time.sleep(0.05)
        threads.append(_waiter(lock, False, order, "click", events[2]))
        events[2].wait(5)
        time.sleep(0.05)
    for thread in threads:
        thread.join(5)
    assert order[0] == "click" and sorted(order[1:]) == ["auto", "scoring"]


def test_background_work_runs_when_no_click_waits():
    lock, order = PriorityLock(), []
    done = threading.Event()
    thread = _waiter(lock, True, order, "auto", done)
    thread.join(5)
    assert order == ["auto"]
    with lock:  # and the lock is free again for a click
        order.append("click")
    assert order == ["auto", "click"]
