"""Stopping background tasks for sure.

The MongoDB driver (pymongo 4.20, async) can swallow a cancellation: one that arrives while it
sends a command is turned into the driver's own timeout error (reproduced: a task cancelled
right after it began a `ping` against a stalled server ends with NetworkTimeout, not
CancelledError). A loop cancelled at that moment catches that error like any other and goes
on, and a plain `task.cancel(); await gather(task)` waits for it forever: a gateway whose start
failed hung this way. So a stop repeats the cancellation until the task has ended.
"""

from __future__ import annotations

import asyncio
from typing import Any

RESEND_S = 1.0


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel the tasks and return once every one has ended (their errors are not raised)."""
    started = [task for task in tasks if task is not None]
    pending = {task for task in started if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RESEND_S)
    await asyncio.gather(*started, return_exceptions=True)  # their outcomes, retrieved
