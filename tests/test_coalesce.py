"""CoalescedRead: a burst of callers shares one blocking read, and nobody gets a stale one."""

import asyncio
import threading

from semilla.serve.coalesce import CoalescedRead


def test_a_burst_of_callers_shares_one_read_in_one_thread():
    calls, threads = [], set()

    def read():
        calls.append(1)
        threads.add(threading.get_ident())
        return 7

    async def burst():
        shared = CoalescedRead(read)
        return await asyncio.gather(*(shared() for _ in range(64)))

    assert asyncio.run(burst()) == [7] * 64
    assert len(calls) == 1
    assert threading.get_ident() not in threads  # the read ran off the event loop


def test_a_caller_arriving_during_a_read_waits_for_the_next_one():
    """The value changes while the first read runs: a caller that arrived after the first read
    began must see the new value, as every caller would without coalescing."""
    value, started, release = [1], threading.Event(), threading.Event()

    def read():
        seen = value[0]
        started.set()
        release.wait(5)
        return seen

    async def scenario():
        shared = CoalescedRead(read)
        first = asyncio.ensure_future(shared())
        await asyncio.to_thread(started.wait, 5)  # the first read is under way
        value[0] = 2  # a change lands (a key revoked elsewhere)
        late = [asyncio.ensure_future(shared()) for _ in range(10)]
        await asyncio.sleep(0.05)
        release.set()
        return await first, await asyncio.gather(*late)

    first, late = asyncio.run(scenario())
    assert first == 1
    assert late == [2] * 10


def test_a_failed_read_fails_its_callers_and_the_next_read_runs_again():
    outcomes = iter([RuntimeError("store down"), 5])

    def read():
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def twice():
        shared = CoalescedRead(read)
        failed = await asyncio.gather(shared(), shared(), return_exceptions=True)
        return failed, await shared()

    failed, after = asyncio.run(twice())
    assert [str(e) for e in failed] == ["store down", "store down"]
    assert after == 5


def test_a_cancelled_caller_does_not_cancel_the_read_others_wait_for():
    release = threading.Event()

    def read():
        release.wait(5)
        return "done"

    async def scenario():
        shared = CoalescedRead(read)
        quitter, stayer = asyncio.ensure_future(shared()), asyncio.ensure_future(shared())
        await asyncio.sleep(0.02)
        quitter.cancel()
        release.set()
        return await stayer, quitter.cancelled()

    assert asyncio.run(scenario()) == ("done", True)
