"""Process plumbing: busy polling keeps the event loop polling only while activity flows; freezing the
start-up objects takes them out of the garbage collector's full collections; a frame is written at once
only to an open, unpaused connection; a task whose cancel Python 3.11's wait_for lost is cancelled again
until it ends."""

from __future__ import annotations

import asyncio
import gc

from marginflow import process


def test_busy_poll_polls_after_activity_then_sleeps():
    async def body():
        loop = asyncio.get_running_loop()
        polls = {"n": 0}
        select = loop._selector.select  # count the event loop's polls of its sockets

        def counting(timeout=None):
            polls["n"] += 1
            return select(timeout)

        loop._selector.select = counting
        activity = asyncio.Event()
        task = asyncio.create_task(process.busy_poll(0.05, activity))
        await asyncio.sleep(0.01)
        polls["n"] = 0
        await asyncio.sleep(0.1)
        idle = polls["n"]  # nothing happened: the poller waits, the loop sleeps in its poll
        activity.set()
        polls["n"] = 0
        await asyncio.sleep(0.04)
        busy = polls["n"]  # within the window after the activity: polling without sleeping
        await asyncio.sleep(0.05)
        polls["n"] = 0
        await asyncio.sleep(0.1)
        after = polls["n"]  # the window passed: asleep again
        task.cancel()
        loop._selector.select = select
        return idle, busy, after

    idle, busy, after = asyncio.run(body())
    assert idle <= 3 and after <= 3
    assert busy >= 50, busy


def _lost_cancel_task() -> tuple[asyncio.Task, asyncio.Future, list[str]]:
    """A task in `wait_for(fut, 5)` (as a nats-py request) that then waits an hour."""
    fut = asyncio.get_running_loop().create_future()
    went_on: list[str] = []

    async def requester():
        await asyncio.wait_for(fut, 5)
        went_on.append("after the request")
        await asyncio.sleep(3600)

    return asyncio.create_task(requester()), fut, went_on


def test_a_cancel_lost_in_wait_for_is_made_again_until_the_task_ends():
    async def body():
        task, fut, went_on = _lost_cancel_task()
        await asyncio.sleep(0)  # in wait_for
        fut.set_result(None)  # the reply comes in the step the cancel does
        await asyncio.wait_for(process.cancel_and_wait(task, again_s=0.05), 2)
        return task, went_on

    task, went_on = asyncio.run(body())
    assert went_on == ["after the request"]  # the first cancel was lost (as in nats-py's requests)
    assert task.cancelled()


def test_the_lost_cancel_hangs_a_single_cancel_and_gather():
    """What `cancel_and_wait` is for: the one cancel the servers' stop() made before did not end it."""

    async def body():
        task, fut, _ = _lost_cancel_task()
        await asyncio.sleep(0)
        fut.set_result(None)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=0.3)
        await process.cancel_and_wait(task)
        return done

    assert asyncio.run(body()) == set()


def test_freeze_startup_objects_empties_the_collected_generations():
    junk = [{"k": [i]} for i in range(1000)]
    try:
        process.freeze_startup_objects()
        assert gc.get_freeze_count() >= len(junk)
        assert sum(gc.get_count()) < 100  # the generations the collector walks start (nearly) empty
    finally:
        gc.unfreeze()


def test_write_now_writes_open_unpaused_connections_only():
    """Text frames go out as text, bytes as binary; a paused (flow control) or closing connection is
    left to the caller's queue."""
    from types import SimpleNamespace

    from websockets.protocol import State

    sent: list[tuple[str, bytes]] = []
    flushed = []
    ws = SimpleNamespace(
        protocol=SimpleNamespace(
            state=State.OPEN,
            send_text=lambda b: sent.append(("text", b)),
            send_binary=lambda b: sent.append(("binary", b)),
        ),
        paused=False,
        send_data=lambda: flushed.append(1),
    )
    assert process.write_now(ws, '{"type":"margin"}') and process.write_now(ws, b"\x81\xa1x")
    assert sent == [("text", b'{"type":"margin"}'), ("binary", b"\x81\xa1x")] and len(flushed) == 2
    ws.paused = True
    assert not process.write_now(ws, b"later")
    ws.paused, ws.protocol.state = False, State.CLOSING
    assert not process.write_now(ws, b"later")
    assert len(sent) == 2
