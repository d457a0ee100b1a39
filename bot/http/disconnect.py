"""Work for a client that may leave: a non-streamed reply nobody waits for any more is cancelled.

A streamed reply stops when its client goes (`turns.EventStream`); a plain JSON answer is made in full
before anything is sent, so without this a client that timed out would keep a model slot until the reply
finished. Cancelling the reply records the turn as interrupted and frees the slot at the worker's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer was ready; nobody is left to answer."""


async def while_connected(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`, or `ClientGone` once the client disconnects (and `work` cancelled)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if watcher.done():
                raise ClientGone
        watcher.cancel()
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the server says the client went away (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
