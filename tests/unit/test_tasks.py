"""Stopping a task that swallows its first cancellation, as the MongoDB driver makes a loop do
when the cancellation arrives while it sends a command (app/tasks.py)."""

from __future__ import annotations

import asyncio

from app.tasks import cancel_and_wait


async def _loop_that_swallows_one_cancellation(passes: list[str]) -> None:
    while True:
        try:
            await asyncio.sleep(3600)  # a database call, in the real loops
        except asyncio.CancelledError:
            if passes:
                raise
            passes.append("swallowed")  # what the driver's timeout error looks like to the loop
        passes.append("went on")


async def test_a_task_that_swallowed_a_cancellation_is_cancelled_again_until_it_ends() -> None:
    passes: list[str] = []
    task = asyncio.create_task(_loop_that_swallows_one_cancellation(passes))
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task), timeout=10)
    assert task.cancelled() and passes == ["swallowed", "went on"]


async def test_plain_cancel_and_gather_would_have_waited_forever() -> None:
    """The test above can fail: without the repeat, the stop does not end."""
    passes: list[str] = []
    task = asyncio.create_task(_loop_that_swallows_one_cancellation(passes))
    await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=0.5)
    assert not done and passes == ["swallowed", "went on"]
    await cancel_and_wait(task)


async def test_ended_tasks_and_none_are_accepted_and_errors_are_not_raised() -> None:
    async def fails() -> None:
        raise RuntimeError("its own error")

    failed = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await cancel_and_wait(failed, None)
    assert isinstance(failed.exception(), RuntimeError)
