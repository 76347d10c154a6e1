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


def test_a_background_forward_steps_aside_between_blocks_for_a_click():
    """A click arriving during a background forward runs before that forward's next network block."""
    import torch

    from mvseg import MultiverSegNet, Predictor
    from mvseg.network import MultiverSegConfig

    predictor = Predictor(MultiverSegNet(MultiverSegConfig(encoder_widths=[8, 8, 8, 8])), device="cpu", size=32)
    events, click_started = [], threading.Event()
    blocks = list(predictor.model.enc_blocks) + list(predictor.model.dec_blocks)

    def slow_block(i):
        def hook(*_):
            events.append(f"block{i}")
            if i == 1 and threading.current_thread().name == "auto":
                click_started.set()  # the click arrives mid-forward
                time.sleep(0.3)
        return hook

    for i, block in enumerate(blocks):
        block.register_forward_hook(slow_block(i))
    target, ctx = torch.rand(1, 5, 32, 32), torch.rand(1, 2, 1, 32, 32)

    def background_forward():
        with predictor.background():
            predictor.forward(target, ctx, ctx)

    def click():
        click_started.wait(5)
        predictor.forward(target, ctx, ctx)

    threads = [threading.Thread(target=background_forward, name="auto"), threading.Thread(target=click)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    # the background forward had run blocks 0 and 1; the click's whole forward comes before its block 2
    assert events[:2] == ["block0", "block1"] and events[2:2 + len(blocks)] == [f"block{i}" for i in range(len(blocks))]
