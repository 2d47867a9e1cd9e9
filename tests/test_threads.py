"""Thread primitives: the one-waiter condition, the latch, the counting queue, gather."""

import logging
import queue
import threading

import pytest

from pgws_sync._threads import CountingQueue, Latch, OneWaiter, gather

from .helpers import wait_for


def test_the_one_waiter_condition_refuses_a_second_waiter_instead_of_leaving_it_asleep():
    """A second thread waiting while one already does raises at once (a blocking put
    or join on a FrameQueue would); the first is still woken by notify."""
    cond = OneWaiter(threading.Lock())
    woken = []

    def first():
        with cond:
            woken.append(cond.wait(timeout=30))

    thread = threading.Thread(target=first)
    thread.start()
    wait_for(lambda: cond._waiter is not None, message="the first thread waiting")
    with cond:
        with pytest.raises(RuntimeError, match="already waiting"):
            cond.wait(timeout=5)
        cond.notify()
    thread.join(10)
    assert woken == [True] and cond._waiter is None


def test_a_latch_is_a_one_way_flag():
    latch = Latch()
    assert not latch.is_set() and latch.wait(0.01) is False
    waiter = threading.Thread(target=latch.wait, args=(10,))
    waiter.start()
    latch.set()
    latch.set()  # setting twice is harmless
    waiter.join(10)
    assert not waiter.is_alive() and latch.is_set() and latch.wait(0)


def test_a_counting_queue_counts_what_measure_says_and_takes_any_item_when_empty():
    class Sized(CountingQueue):
        @staticmethod
        def measure(item):
            return len(item), 0

    items = Sized(3, 100)
    items.put_nowait("abcd")  # too big, but the queue is empty
    with pytest.raises(queue.Full):
        items.put_nowait("a")
    assert items.get_nowait() == "abcd" and items.qsize() == 0
    items.put_nowait("ab")
    assert not items.has_room()


def test_gather_waits_once_for_all_and_logs_the_threads_that_did_not_stop(caplog):
    stop = threading.Event()
    quick = threading.Thread(target=lambda: None, name="quick", daemon=True)
    stuck = threading.Thread(target=stop.wait, args=(30,), name="stuck", daemon=True)
    unstarted = threading.Thread(target=lambda: None, name="unstarted")
    quick.start()
    stuck.start()
    with caplog.at_level(logging.WARNING, logger="pgws_sync._threads"):
        late = gather([quick, None, stuck, unstarted, threading.current_thread()], 0.05)
    stop.set()
    stuck.join(10)
    assert late == [stuck]
    assert [r.getMessage() for r in caplog.records] == ["thread stuck did not stop within 0.1s"]
